"""Untrusted input never executes: crafted pickles on every loading path, YAML tags, archive escapes."""

import io
import os
import re
import tarfile

import pytest
import torch

from conftest import tiny_run
from crossdistill.config import ModelConfig, build_config, load_config
from crossdistill.engine import Trainer, train
from crossdistill.errors import CrossDistillError


class Payload:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious(path, marker, wrap=True):
    obj = {"state_dict": {"conv.weight": torch.zeros(1)}, "evil": Payload(marker)} if wrap else Payload(marker)
    torch.save(obj, path)
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a checkpoint executed code while loading"


def test_the_payload_is_real(tmp_path):
    """Control: loading it without weights_only does run the command."""
    target = tmp_path / "control"
    write_malicious(tmp_path / "x.pth", target)
    torch.load(tmp_path / "x.pth", weights_only=False)
    assert target.exists()


def test_teacher_checkpoint_path(tmp_path, marker):
    from crossdistill.models import create_model

    evil = write_malicious(tmp_path / "teacher.pth", marker)
    with pytest.raises(CrossDistillError, match="refused to load"):
        create_model(ModelConfig(name="test_resnet", checkpoint=str(evil)), 10)
    raw = tiny_run(tmp_path)
    raw["teacher"]["checkpoint"] = str(evil)
    with pytest.raises(CrossDistillError, match="refused to load"):
        train(build_config(raw))


def test_resume_path(tmp_path, marker):
    raw = tiny_run(tmp_path, method="vanilla", train={"epochs": 1})
    train(build_config(raw))
    run_dir = tmp_path / "runs" / "run"
    write_malicious(run_dir / "last.pt", marker)
    with pytest.raises(CrossDistillError, match="refused to load"):
        Trainer(build_config(raw), resume=True)


def test_eval_and_export_paths(tmp_path, marker):
    from crossdistill.evaluation import evaluate_checkpoint
    from crossdistill.export import export_run

    raw = tiny_run(tmp_path, method="vanilla", train={"epochs": 1})
    train(build_config(raw))
    run_dir = tmp_path / "runs" / "run"
    evil = write_malicious(run_dir / "best.pt", marker)
    with pytest.raises(CrossDistillError, match="refused to load"):
        evaluate_checkpoint(str(evil), model="test_resnet", dataset="digits")
    with pytest.raises(CrossDistillError, match="refused to load"):
        export_run(run_dir, weights="best")


def test_yaml_python_tags_are_refused(tmp_path, marker):
    path = tmp_path / "evil.yaml"
    path.write_text(f"student: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(CrossDistillError, match="cannot parse"):
        load_config(path)
    base = tmp_path / "child.yaml"
    base.write_text("base: evil.yaml\n")
    with pytest.raises(CrossDistillError, match="cannot parse"):
        load_config(base)


def test_archive_escapes_are_refused(tmp_path):
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"not really an image"
        info = tarfile.TarInfo("train/cat/../../../../escaped.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    raw = tiny_run(
        tmp_path,
        data={
            "dataset": "folder",
            "root": str(archive),
            "train_subset": None,
            "eval_subset": None,
            "cache_dir": str(tmp_path / "cache"),
        },
    )
    with pytest.raises(CrossDistillError, match=r"\.\."):
        train(build_config(raw))
    assert not list(tmp_path.parent.glob("**/escaped.jpg"))


def shared_reference_bomb(levels: int = 10, width: int = 4) -> list:
    """A list that pickles to a few hundred bytes but, walked as a tree, holds width**(levels + 1) strings."""
    value = ["lol"] * width
    for _ in range(levels):
        value = [value] * width
    return value


@pytest.mark.parametrize("bomb", ["shared references", "a cycle"])
def test_eval_bounds_the_config_stored_in_a_checkpoint(tmp_path, capsys, bomb):
    """eval builds its settings from the config a run checkpoint stores: a crafted one must not expand."""
    import timm

    from crossdistill.cli import main
    from crossdistill.evaluation import evaluate_checkpoint

    config = tiny_run(tmp_path, method="vanilla")
    if bomb == "a cycle":
        config["student"]["kwargs"] = {"again": config}
    else:
        config["student"]["kwargs"] = {"depth": shared_reference_bomb()}
    path = tmp_path / "best.pt"
    torch.save({"student": timm.create_model("test_resnet", num_classes=10).state_dict(), "config": config}, path)
    assert path.stat().st_size < 3_000_000
    limit = "expands to more than 100,000 values" if bomb == "shared references" else "more than 50 levels deep"
    with pytest.raises(CrossDistillError, match=rf"the run config stored in {re.escape(str(path))} .*{limit}"):
        evaluate_checkpoint(str(path))
    assert main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and len(err) < 400, err[:1000]
