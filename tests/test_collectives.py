"""crossdistill.collectives: every collective of the package, each returning only once gloo's worker threads have
let go of its tensors (a drop that lands during interpreter shutdown aborts a run that succeeded)."""

import os
import re
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import cpu_process_group, free_port
from crossdistill import collectives
from crossdistill.collectives import all_gather, all_gather_objects, all_reduce, broadcast_object

SRC = Path(collectives.__file__).parent


def _held_by_a_slow_worker(*tensors: torch.Tensor, seconds: float = 0.3) -> None:
    """What gloo does under load: a thread other than the caller's keeps the tensors a while after the call."""
    threading.Thread(target=lambda kept: time.sleep(seconds), args=(list(tensors),), daemon=True).start()


def _other_threads_hold(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s Python object has references that go once every other thread is done."""
    now = sys.getrefcount(tensor)
    time.sleep(0.5)
    return sys.getrefcount(tensor) < now


def test_all_reduce_returns_once_no_other_thread_holds_the_tensor(monkeypatch):
    """The run that ended in SIGABRT: gloo's thread dropped its last all-reduce's tensor during shutdown."""
    monkeypatch.setattr(collectives.dist, "all_reduce", lambda tensor, op: _held_by_a_slow_worker(tensor))
    flag = torch.ones(1)
    assert all_reduce(flag) is flag
    assert not _other_threads_hold(flag)


def test_all_gather_waits_for_its_parts_and_the_copy_it_sent(monkeypatch):
    monkeypatch.setattr(collectives.dist, "get_world_size", lambda: 2)
    sent = []

    def gather(parts, source):
        sent.append(weakref.ref(source))
        _held_by_a_slow_worker(source, *parts)

    monkeypatch.setattr(collectives.dist, "all_gather", gather)
    parts = all_gather(torch.ones(2, 3).t())  # not contiguous: the copy sent exists only for the collective
    assert len(parts) == 2 and all(p.shape == (3, 2) for p in parts)
    assert sent[0]() is None
    assert not any(_other_threads_hold(p) for p in parts)


def test_a_tensor_another_thread_keeps_is_not_waited_for_forever(monkeypatch):
    monkeypatch.setattr(collectives, "RELEASE_WAIT_S", 0.0)
    keeper = []
    monkeypatch.setattr(collectives.dist, "all_reduce", lambda tensor, op: keeper.append(tensor))
    assert all_reduce(torch.ones(1)).item() == 1.0


def test_no_module_runs_a_collective_of_torch_directly():
    """One place for them, so that each waits for gloo's threads (object collectives included: torch's allocate
    tensors nobody can wait for)."""
    collective = re.compile(
        r"\b(?:dist|torch\.distributed)\.(all_reduce|all_gather\w*|broadcast\w*|reduce\w*|gather\w*|scatter\w*"
        r"|barrier|send|recv|isend|irecv|all_to_all\w*)\("
    )
    found = [
        f"{path.relative_to(SRC)}:{number}: {line.strip()}"
        for path in SRC.rglob("*.py")
        if path.name != "collectives.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if collective.search(line)
    ]
    assert found == []


def _objects_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with cpu_process_group(rank, world_size, port):
        mine = {"rank": rank, "payload": "x" * (10 + 1000 * rank), "tensor": torch.arange(rank + 2)}
        gathered = all_gather_objects(mine, torch.device("cpu"))
        decided = broadcast_object({"from": rank, "resume": True} if rank == 0 else None, torch.device("cpu"))
        summed = all_reduce(torch.tensor([float(rank + 1)]))
        torch.save({"gathered": gathered, "decided": decided, "summed": summed}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
def test_object_collectives_across_two_processes_with_objects_of_different_sizes(tmp_path):
    mp.start_processes(_objects_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        assert [g["rank"] for g in got["gathered"]] == [0, 1]
        assert [len(g["payload"]) for g in got["gathered"]] == [10, 1010]
        assert torch.equal(got["gathered"][1]["tensor"], torch.arange(3))
        assert got["decided"] == {"from": 0, "resume": True}
        assert got["summed"].item() == 3.0
