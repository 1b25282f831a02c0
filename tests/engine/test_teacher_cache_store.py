"""The teacher cache's store on its own (no training run): what lookup stores and returns, checksums,
damaged files, key.json, epochs. The end-to-end runs are in test_teacher_cache.py."""

import errno
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from crossdistill.engine.teacher_cache import (
    TeacherCache,
    _Store,
    cache_widths,
    key_digest,
    prefetched_outputs,
    prepare_stores,
    state_dict_sha256,
)
from crossdistill.errors import CrossDistillError
from crossdistill.models import TeacherOutputs

KEY = {"teacher": {"name": "vit/tiny:1"}, "seed": 3}
ROWS, WIDTH = 6, 4


class Teacher:
    """compute(images): outputs from the images' first pixel, counting its calls."""

    def __init__(self, offset=0.0):
        self.calls, self.offset = 0, offset

    def __call__(self, images):
        self.calls += 1
        base = images[:, 0, 0, 0:1] + self.offset
        return TeacherOutputs(embedding=base.repeat(1, WIDTH) + torch.arange(WIDTH) / 3, logits=base.repeat(1, 2))


def _images(indices):
    return torch.tensor(indices, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 1, 2).contiguous() + 0.1


def _cache(tmp_path, outputs=("embedding",), store="fp32", log=None, key=KEY):
    return TeacherCache(
        tmp_path,
        key,
        outputs,
        {"embedding": WIDTH, "logits": 2},
        ROWS,
        store_dtype=store,
        log=log if log is not None else (lambda message: None),
    )


def _lookup(cache, indices, teacher):
    return cache.lookup(torch.tensor(indices), _images(indices), teacher)


def test_missing_rows_are_computed_once_stored_and_then_read(tmp_path):
    cache, teacher = _cache(tmp_path, outputs=("embedding", "logits")), Teacher()
    cache.begin_epoch(0)
    first = _lookup(cache, [4, 1], teacher)
    assert teacher.calls == 1 and (cache.hits, cache.misses) == (0, 2)
    assert torch.equal(first.embedding, teacher(_images([4, 1])).embedding)
    assert torch.equal(first.logits, teacher(_images([4, 1])).logits)
    teacher.calls = 0
    again = _lookup(cache, [1, 4], teacher)
    assert teacher.calls == 0 and (cache.hits, cache.misses) == (2, 2)
    assert torch.equal(again.embedding, first.embedding.flip(0)) and again.embedding.dtype == torch.float32
    assert not cache.epoch_complete(0)
    _lookup(cache, [0, 2, 3, 5], teacher)
    assert (cache.hits, cache.misses) == (2, 6)  # counted over the epoch
    assert cache.epoch_complete(0) and not cache.epoch_complete(1)


def test_rows_come_back_on_the_batch_device(tmp_path):
    cache = _cache(tmp_path)
    cache.begin_epoch(0)
    _lookup(cache, [1, 2], Teacher())
    on_meta = cache.lookup(torch.tensor([2, 1]), _images([2, 1]).to("meta"), Teacher())  # all stored: no compute
    assert on_meta.embedding.device.type == "meta" and on_meta.embedding.dtype == torch.float32


def test_a_row_missing_in_any_output_is_recomputed(tmp_path):
    cache = _cache(tmp_path, outputs=("embedding", "logits"))
    cache.begin_epoch(0)
    good = _lookup(cache, [0, 1], Teacher())
    cache.stores["embedding"].check[1] = -1  # the embedding row lost, the logits row intact
    teacher = Teacher()
    again = _lookup(cache, [0, 1], teacher)
    assert teacher.calls == 1 and torch.equal(again.embedding, good.embedding)


def test_a_batch_with_some_rows_stored_keeps_the_stored_ones(tmp_path):
    cache = _cache(tmp_path)
    cache.begin_epoch(0)
    stored = _lookup(cache, [2], Teacher()).embedding
    other = Teacher(offset=100.0)  # what a rerun of the teacher would give: must not replace stored rows
    mixed = _lookup(cache, [3, 2], other)
    assert other.calls == 1 and (cache.hits, cache.misses) == (1, 2)
    assert torch.equal(mixed.embedding[1], stored[0])
    assert torch.equal(mixed.embedding[0], other(_images([3])).embedding[0])
    assert torch.equal(_lookup(cache, [3, 2], Teacher()).embedding, mixed.embedding)


def test_fp16_returns_the_stored_rounded_values_when_filling_too(tmp_path):
    cache = _cache(tmp_path, store="fp16")
    cache.begin_epoch(0)
    teacher = Teacher(offset=1e-3)
    filled = _lookup(cache, [0, 1], teacher)
    exact = teacher(_images([0, 1])).embedding
    assert torch.equal(filled.embedding, exact.half().float()) and not torch.equal(filled.embedding, exact)
    assert torch.equal(_lookup(cache, [0, 1], teacher).embedding, filled.embedding)
    assert np.load(cache.dir / "epoch-0000" / "embedding.npy").dtype == np.float16


def test_epochs_are_stored_apart(tmp_path):
    cache = _cache(tmp_path)
    cache.begin_epoch(0)
    _lookup(cache, [1], Teacher())
    cache.begin_epoch(3)
    later = Teacher(offset=5.0)
    assert torch.equal(_lookup(cache, [1], later).embedding, later(_images([1])).embedding)
    assert later.calls == 2 and sorted(p.name for p in cache.dir.iterdir()) == [
        ".prepare.lock",
        "epoch-0000",
        "epoch-0003",
        "key.json",
    ]
    cache.close()
    with pytest.raises(RuntimeError, match="^TeacherCache.lookup before begin_epoch$"):
        _lookup(cache, [1], Teacher())
    with pytest.raises(RuntimeError, match="^TeacherCache.lookup before begin_epoch$"):
        _lookup(_cache(tmp_path), [1], Teacher())  # a new cache, too
    shutil.rmtree(cache.dir)  # removed while the run goes on: the next epoch makes it again
    cache.begin_epoch(4)
    assert (cache.dir / "epoch-0004" / "embedding.npy").is_file()


def test_a_damaged_row_is_recomputed_with_one_warning(tmp_path):
    messages = []
    cache = _cache(tmp_path, log=messages.append)
    cache.begin_epoch(0)
    good = _lookup(cache, [0, 1, 2], Teacher()).embedding
    cache.close()
    data = np.load(tmp_path.joinpath(cache.dir, "epoch-0000", "embedding.npy"), mmap_mode="r+")
    data[1, 0] += 1.0
    data.flush()
    del data
    cache.begin_epoch(0)
    teacher = Teacher()
    for _ in range(2):
        assert torch.equal(_lookup(cache, [0, 1, 2], teacher).embedding, good)
    assert teacher.calls == 1 and cache.misses == 3 + 1
    assert messages == [
        f"warning: teacher cache {cache.dir / 'epoch-0000' / 'embedding.npy'}: 1 row(s) fail their "
        "checksum; recomputing them"
    ]


def test_the_worker_read_gives_each_sample_its_rows_and_whether_they_are_whole(tmp_path):
    cache = _cache(tmp_path, outputs=("embedding", "logits"))
    cache.begin_epoch(0)
    filled = _lookup(cache, [4], Teacher())
    rows, ok = cache.read_rows(4)
    assert ok and np.array_equal(rows["embedding"], filled.embedding[0].numpy())
    assert np.array_equal(rows["logits"], filled.logits[0].numpy())
    assert cache.read_rows(3)[1] is False


@pytest.mark.parametrize("damage", ["truncate", "shape", "dtype", "check", "one_missing"])
def test_damaged_files_are_rebuilt_with_a_warning(tmp_path, damage):
    folder = tmp_path / "epoch-0000"
    folder.mkdir()
    messages = []
    store = _Store(folder, "embedding", ROWS, WIDTH, np.float32, messages.append)
    store.prepare()
    assert messages == []  # creating missing files is no damage
    data, check = folder / "embedding.npy", folder / "embedding.check.npy"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:40])
    elif damage == "shape":
        np.save(data, np.zeros((ROWS, WIDTH + 1), np.float32))
    elif damage == "dtype":
        np.save(data, np.zeros((ROWS, WIDTH), np.float16))
    elif damage == "check":
        np.save(check, np.zeros(ROWS, np.int32))
    else:
        check.unlink()
    store.prepare()
    assert len(messages) == 1 and f"teacher cache file {data} is damaged" in messages[0]
    if damage in ("truncate", "one_missing"):  # unreadable: the error is named
        assert re.search(r"is damaged \(\w+Error: ", messages[0]), messages[0]
    assert messages[0].endswith("; rebuilding it")
    assert np.load(data).shape == (ROWS, WIDTH) and np.load(data).dtype == np.float32
    assert np.array_equal(np.load(check), np.full(ROWS, -1, np.int64))
    store.prepare()
    assert len(messages) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["embedding.check.npy", "embedding.npy"]


def test_an_existing_file_is_never_replaced(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(3))
    _Store._create(path, (5,), np.dtype(np.int64), fill=-1)
    assert np.array_equal(np.load(path), np.arange(3)) and [p.name for p in tmp_path.iterdir()] == ["x.npy"]


def test_an_unopenable_file_is_a_clear_error(tmp_path):
    store = _Store(tmp_path, "embedding", ROWS, WIDTH, np.float32, print)
    with pytest.raises(CrossDistillError, match=f"^cannot open teacher cache file {tmp_path / 'embedding.npy'}: "):
        store.open()


def test_the_directory_and_key_json(tmp_path):
    messages = []
    cache = _cache(tmp_path / "new" / "root", log=messages.append)  # missing parents are made
    tmp_path = tmp_path / "new" / "root"
    digest = key_digest(KEY)
    assert cache.dir == tmp_path / f"vit_tiny_1-{digest[:16]}"
    record = json.loads((cache.dir / "key.json").read_text())
    assert record == {"digest": digest, "key": KEY}
    assert list(cache.dir.iterdir()) == [cache.dir / "key.json"]  # no temporary file left
    _cache(tmp_path, log=messages.append)  # the same key: accepted as it is
    assert messages == []
    (cache.dir / "key.json").write_text("{not json")
    _cache(tmp_path, log=messages.append)
    assert messages == [f"warning: teacher cache {cache.dir / 'key.json'} is unreadable; rewriting it"]
    assert json.loads((cache.dir / "key.json").read_text()) == record
    record["digest"] = "f" * 64
    (cache.dir / "key.json").write_text(json.dumps(record))
    with pytest.raises(
        CrossDistillError,
        match=f"^teacher cache directory {cache.dir} holds outputs for another key "
        f"\\(digest '{'f' * 64}'\\); remove that directory",
    ):
        _cache(tmp_path)


def test_an_uncreatable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CrossDistillError, match="^cannot create the teacher cache directory"):
        _cache(tmp_path / "file")


def test_the_outputs_are_checked_against_the_stored_width(tmp_path):
    cache = _cache(tmp_path)
    cache.begin_epoch(0)
    narrow = lambda x: TeacherOutputs(embedding=torch.zeros(x.shape[0], WIDTH - 1))  # noqa: E731
    with pytest.raises(
        CrossDistillError,
        match=r"^teacher cache: the teacher's embedding has shape \(2, 3\), "
        r"expected \(2, 4\)$",
    ):
        _lookup(cache, [0, 1], narrow)
    with pytest.raises(CrossDistillError, match=r"has shape None, expected \(1, 4\)"):
        _lookup(cache, [0], lambda x: TeacherOutputs(embedding=None))
    with pytest.raises(RuntimeError, match=r"out of range \[0, 6\)"):
        _lookup(cache, [-1], Teacher())
    with pytest.raises(RuntimeError, match=r"^teacher cache: \(2,\) indices for a batch of 3$"):
        cache.lookup(torch.tensor([0, 1]), _images([0, 1, 2]), Teacher())


def test_describe_names_the_outputs_and_the_size(tmp_path):
    # CIFAR-100 with a 768-d teacher: 50,000 x (768 + 100) x 2 bytes (no file is made before begin_epoch)
    cache = TeacherCache(
        tmp_path, KEY, ("embedding", "logits"), {"embedding": 768, "logits": 100}, 50_000, log=lambda message: None
    )
    assert cache.describe() == (
        f"teacher cache {cache.dir} (embedding, logits; 50000 samples, float16, 82.8 MiB per epoch)"
    )


def test_a_row_whose_checksum_is_zero_is_present(tmp_path, monkeypatch):
    """-1 marks a missing row; every CRC-32, 0 included, marks a present one."""
    from crossdistill.engine import teacher_cache

    monkeypatch.setattr(teacher_cache, "zlib", type("Zlib", (), {"crc32": staticmethod(lambda data: 0)}))
    cache, teacher = _cache(tmp_path), Teacher()
    cache.begin_epoch(0)
    _lookup(cache, list(range(ROWS)), teacher)
    assert cache.epoch_complete(0) and cache.read_rows(2)[1] is True
    _lookup(cache, [2, 3], teacher)
    assert teacher.calls == 1


def test_each_warning_is_given_once(tmp_path):
    messages = []
    cache = _cache(tmp_path, log=messages.append)
    for _ in range(2):
        cache.warn("the same problem")
        cache.warn("another problem")
    assert messages == ["warning: the same problem", "warning: another problem"]


def test_the_state_dict_hash_covers_names_dtypes_shapes_and_buffers():
    model = torch.nn.BatchNorm1d(3)
    base = state_dict_sha256(model)
    assert len(base) == 64 and state_dict_sha256(torch.nn.BatchNorm1d(3)) == base
    model.running_mean += 1  # a buffer
    assert state_dict_sha256(model) != base
    assert state_dict_sha256(torch.nn.BatchNorm1d(3).double()) != base
    renamed = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    assert state_dict_sha256(renamed) != base
    flat, square = torch.nn.Linear(4, 1, bias=False), torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        square.weight.copy_(flat.weight.view(2, 2))
    assert state_dict_sha256(flat) != state_dict_sha256(square)


def test_the_key_layout_is_pinned(tmp_path):
    """Caches written by one version must be found by the next: a change to this layout (a field renamed,
    a value spelled another way) orphans every cache on disk, so it goes with a new CACHE_FORMAT."""
    from types import SimpleNamespace

    import PIL
    import timm
    import torchvision

    import crossdistill
    from crossdistill.engine.teacher_cache import CACHE_FORMAT, DATA_KEY_FIELDS, cache_key
    from crossdistill.models import Teacher as RealTeacher

    root = tmp_path / "images.tar.gz"
    root.write_bytes(b"12345")
    data = SimpleNamespace(**{name: f"<{name}>" for name in DATA_KEY_FIELDS}, val_fraction=None, val_seed=0)
    data.root, data.scale = str(root), (0.5, 1.0)
    cfg = SimpleNamespace(
        teacher=SimpleNamespace(name="vit_t", kwargs={"img_size": 32}), data=data, train=SimpleNamespace(seed=11)
    )
    model = torch.nn.Linear(2, 2)
    model.num_features = 2
    teacher = RealTeacher(model, (0.5,) * 3, (0.25,) * 3, (0.0,) * 3, (1.0,) * 3)
    key = cache_key(
        cfg,
        teacher,
        num_train=100,
        data_mean=(0.5,) * 3,
        data_std=(0.25,) * 3,
        device_type="cuda",
        amp_dtype=torch.bfloat16,
        channels_last=1,
        store_dtype="fp16",
    )
    expected_data = {name: f"<{name}>" for name in DATA_KEY_FIELDS}
    expected_data.update(
        root=str(root),
        scale=[0.5, 1.0],
        num_train=100,
        resolved_mean=[0.5] * 3,
        resolved_std=[0.25] * 3,
        root_file={"size": 5, "mtime_ns": root.stat().st_mtime_ns},
    )
    assert key == {
        "format": CACHE_FORMAT,
        "teacher": {
            "name": "vit_t",
            "kwargs": {"img_size": 32},
            "sha256": state_dict_sha256(model),
            "renormalization": {"scale": [0.25] * 3, "shift": [0.5] * 3},
        },
        "data": expected_data,
        "seed": 11,
        "compute": {
            "device": "cuda",
            "amp": "bfloat16",
            "channels_last": True,
            "store": "fp16",
            "torch": torch.__version__,
            "timm": timm.__version__,
        },
        "code": {
            "crossdistill": crossdistill.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
        },
    }
    data.root = str(tmp_path)  # a folder (or nothing): no file identity
    plain = cache_key(
        cfg,
        RealTeacher(model),
        num_train=100,
        data_mean=(0.5,) * 3,
        data_std=(0.25,) * 3,
        device_type="cpu",
        amp_dtype=None,
        channels_last=False,
        store_dtype="fp32",
    )
    assert plain["data"]["root_file"] is None and plain["teacher"]["renormalization"] is None
    assert plain["compute"]["amp"] == "none" and plain["compute"]["channels_last"] is False
    assert key_digest({"a": 1, "b": [1, 2]}) == key_digest({"b": [1, 2], "a": 1})  # insertion order is no part


def test_key_json_is_written_for_people(tmp_path):
    cache = _cache(tmp_path)
    assert (cache.dir / "key.json").read_text() == (
        '{\n  "digest": "' + key_digest(KEY) + '",\n  "key": {\n    "seed": 3,\n    "teacher": {\n'
        '      "name": "vit/tiny:1"\n    }\n  }\n}'
    )


def test_a_damaged_and_a_missing_row_in_one_batch_are_both_computed(tmp_path):
    cache = _cache(tmp_path)
    cache.begin_epoch(0)
    _lookup(cache, [0, 1], Teacher())
    cache.stores["embedding"].data[1, 0] += 1.0  # row 1 fails its checksum, row 2 was never stored
    teacher = Teacher()
    out = _lookup(cache, [1, 2], teacher)
    assert teacher.calls == 1 and torch.equal(out.embedding, Teacher()(_images([1, 2])).embedding)


# --- reserving the blocks of a new store file; the widths a store is built with; the rows a batch carries ----------


def test_a_new_store_file_has_all_its_blocks_reserved(tmp_path, monkeypatch):
    """Rows are written through a memory map: into a hole of a sparse file on a full disk that kills the process
    (SIGBUS), so every block of a new file is allocated when it is created (the whole file, header included)."""
    calls, real = [], getattr(os, "posix_fallocate", None)

    def fallocate(fd, offset, length):
        calls.append((offset, length, os.fstat(fd).st_size))
        if real is not None:
            real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate, raising=False)
    cache = _cache(tmp_path, store="fp32")
    cache.begin_epoch(0)
    sizes = sorted(p.stat().st_size for p in (cache.dir / "epoch-0000").iterdir())
    assert sorted(length for _, length, _ in calls) == sizes and all(o == 0 for o, _, _ in calls)
    assert all(length == size for _, length, size in calls) and sizes[0] >= 128 + ROWS * 8


@pytest.mark.parametrize("errno_name", ["EOPNOTSUPP", "EINVAL"])
def test_a_file_system_without_fallocate_still_gets_a_working_cache(tmp_path, monkeypatch, errno_name):
    def unsupported(fd, offset, length):
        raise OSError(getattr(errno, errno_name), "fallocate not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    cache, teacher = _cache(tmp_path), Teacher()
    cache.begin_epoch(0)
    _lookup(cache, [0, 5], teacher)
    assert teacher.calls == 1 and torch.equal(_lookup(cache, [5], teacher).embedding, teacher(_images([5])).embedding)
    assert teacher.calls == 2  # the second lookup read the stored row (the extra call is the comparison's)

    monkeypatch.delattr(os, "posix_fallocate", raising=False)  # a platform without it
    cache = _cache(tmp_path / "other")
    cache.begin_epoch(0)
    assert len(list((cache.dir / "epoch-0000").iterdir())) == 2


def test_a_full_disk_while_reserving_is_one_line_naming_the_file_and_its_size(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    cache = TeacherCache(tmp_path, KEY, ("embedding",), {"embedding": 1024}, 1024, store_dtype="fp32", log=print)
    with pytest.raises(CrossDistillError) as raised:
        cache.begin_epoch(0)
    assert str(raised.value) == (
        f"no space left on the device for the teacher cache file {cache.dir / 'epoch-0000' / 'embedding.npy'} "
        "(4.0 MiB); free some space, point train.teacher_cache at another disk, or set train.teacher_cache=null"
    )
    assert not list((cache.dir / "epoch-0000").iterdir())


def test_each_output_is_stored_at_its_own_width():
    class Stub:
        dim = 48

    assert cache_widths(("logits", "embedding"), Stub(), 7) == {"logits": 7, "embedding": 48}
    assert list(cache_widths(("logits", "embedding"), Stub(), 7)) == ["logits", "embedding"]
    assert cache_widths(("embedding",), Stub(), 7) == {"embedding": 48}
    with pytest.raises(KeyError):
        cache_widths(("features",), Stub(), 7)


def test_the_rows_a_batch_carries_become_float32_teacher_outputs():
    rows = {"logits": torch.tensor([[1.5, -2.25]], dtype=torch.float16)}
    outputs = prefetched_outputs(rows, torch.device("cpu"))
    assert outputs.embedding is None and outputs.logits.dtype == torch.float32
    assert torch.equal(outputs.logits, torch.tensor([[1.5, -2.25]]))
    both = prefetched_outputs({"embedding": torch.ones(1, 3, dtype=torch.float64), **rows}, torch.device("cpu"))
    assert both.embedding.dtype == torch.float32 and torch.equal(both.embedding, torch.ones(1, 3))
    assert torch.equal(both.logits, outputs.logits)


def test_a_second_run_preparing_the_same_epoch_waits_instead_of_deleting_half_created_files(tmp_path, monkeypatch):
    """Two workers of a sweep share the cache: one has created an epoch's data file but not its check file yet when
    the other prepares the same epoch. Without the lock the second judged the pair damaged and deleted it."""
    import threading

    folder = tmp_path / "epoch-0000"
    warnings: list[str] = []
    stores = {name: _Store(folder, "embedding", 8, 4, np.float16, warnings.append) for name in ("first", "second")}
    created, resume = threading.Event(), threading.Event()
    create = _Store._create

    def create_then_pause(path, shape, dtype, fill):
        create(path, shape, dtype, fill)
        if threading.current_thread().name == "first" and path.name == "embedding.npy":
            created.set()
            resume.wait()

    monkeypatch.setattr(_Store, "_create", staticmethod(create_then_pause))
    first = threading.Thread(target=prepare_stores, args=(folder, [stores["first"]]), name="first")
    first.start()
    created.wait()
    data_file = os.stat(folder / "embedding.npy").st_ino
    second = threading.Thread(target=prepare_stores, args=(folder, [stores["second"]]), name="second")
    second.start()
    second.join(timeout=5)  # unlocked, the second run does its damage by now; locked, it waits for the first
    resume.set()
    first.join()
    second.join()
    assert warnings == []
    assert os.stat(folder / "embedding.npy").st_ino == data_file  # the first run's file, not deleted and remade
    stores["second"].open()
    assert stores["second"].check.shape == (8,) and (np.asarray(stores["second"].check) == -1).all()
