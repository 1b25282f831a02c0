"""crossdistill export: the student alone, loadable by plain timm / onnxruntime, with the checkpoint's logits."""

import builtins
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY_STUDENT, TINY_TEACHER, tiny_run
from crossdistill import files
from crossdistill.checkpoint import load_weights_file
from crossdistill.cli import main
from crossdistill.config import build_config
from crossdistill.engine import train
from crossdistill.errors import CrossDistillError
from crossdistill.export import export_run, sorted_metadata

SMALL_DATA = {"train_subset": 64, "eval_subset": 40}


def _train(tmp, **sections):
    data = {**SMALL_DATA, **sections.pop("data", {})}
    cfg = tiny_run(tmp, train={"epochs": 1, **sections.pop("train", {})}, data=data, **sections)
    summary = train(build_config(cfg), out=io.StringIO())
    return tmp / "runs" / "run", summary


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """test_vit teacher -> test_resnet student, RSD (AAD extras in last.pt), with an EMA of the student.

    4 steps: timm's ModelEmaV3 copies the weights on its first two updates and averages after that.
    """
    run_dir, _ = _train(tmp_path_factory.mktemp("cnn"), train={"ema_decay": 0.5}, data={"train_subset": 128})
    return run_dir


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """test_resnet teacher -> test_vit student (img_size 32, patch 8), RSD, no EMA."""
    run_dir, _ = _train(
        tmp_path_factory.mktemp("vit"), student=dict(TINY_TEACHER), teacher={**TINY_STUDENT, "kwargs": {}}
    )
    return run_dir


def _images(n=5, size=32, seed=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference_logits(name, kwargs, state, num_classes, x):
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)


def _check_round_trip(run_dir, out_dir, state_key, exporter):
    ckpt = load_weights_file(run_dir / ("last.pt" if state_key == "student_ema" else "best.pt"))
    name, kwargs = ckpt["config"]["student"]["name"], ckpt["config"]["student"]["kwargs"]
    n = ckpt["num_classes"]
    x = _images()
    reference = _reference_logits(name, kwargs, ckpt[state_key], n, x)

    # safetensors: exactly the student's state-dict keys, no AAD/projector, loads with plain timm
    st_path = out_dir / "model.safetensors"
    tensors = load_file(str(st_path))
    assert set(tensors) == set(timm.create_model(name, num_classes=n, **kwargs).state_dict())
    assert set(tensors) == set(ckpt[state_key])
    extras = load_weights_file(run_dir / "last.pt")["extras"]
    assert "aad" in extras  # RSD trained an AAD projector ...
    prefixes = tuple(f"{name}." for name in extras)
    assert not any(k.startswith(prefixes) or "aad" in k for k in tensors)  # ... which is not exported
    for key, value in ckpt[state_key].items():
        assert torch.equal(tensors[key], value), key
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(st_path), num_classes=n), num_classes=n, **kwargs
    )
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference, atol=1e-6, rtol=0)

    # timm state dict (.pth): load_state_dict into a fresh model
    fresh = timm.create_model(name, num_classes=n, **kwargs)
    fresh.load_state_dict(torch.load(out_dir / "model.pth", weights_only=True))
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), reference, atol=1e-6, rtol=0)

    # ONNX through onnxruntime, at batch sizes the export never saw (dynamic batch axis)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input"
    for batch in (x, x[:1]):
        logits = session.run(None, {"input": batch.numpy()})[0]
        np.testing.assert_allclose(logits, reference[: len(batch)].numpy(), atol=1e-4, rtol=0)

    # the sidecar: timm's config.json layout + what crossdistill adds
    sidecar = json.loads((out_dir / "config.json").read_text())
    assert sidecar["architecture"] == name and sidecar["num_classes"] == n
    assert sidecar["label_names"] == ckpt["classes"]
    # written by timm's save_config_for_hf: model_args holds the run's kwargs (img_size as timm's pair) and, in
    # newer timm, the arguments it reads off the model to rebuild it (num_classes, in_chans, global_pool)
    model_args = sidecar.get("model_args", {})
    for key, value in kwargs.items():
        assert model_args[key] in (value, [value, value]), key
    assert model_args.get("num_classes", n) == n
    rebuilt = timm.create_model(name, **{"num_classes": n, **model_args}).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in ckpt[state_key].items()}
    pre = sidecar["pretrained_cfg"]
    assert pre["input_size"] == [3, 32, 32] and pre["mean"] == pytest.approx(ckpt["normalization"]["mean"])
    assert pre["std"] == pytest.approx(ckpt["normalization"]["std"])
    assert pre["interpolation"] and pre["crop_pct"] > 0
    assert sidecar["crossdistill"]["onnx"]["exporter"] == exporter
    # ... which makes the directory itself a timm model
    local = timm.create_model(f"local-dir:{out_dir}", pretrained=True)
    with torch.no_grad():
        assert torch.allclose(local.eval()(x), reference, atol=1e-6, rtol=0)
    return tensors


def test_cnn_student_round_trip_with_ema(cnn_run, tmp_path):
    out = io.StringIO()
    result = export_run(
        cnn_run, formats=["safetensors", "timm", "onnx"], out=tmp_path / "ema", onnx_exporter="torchscript", stream=out
    )
    assert result.weights == "ema" and result.checkpoint.name == "last.pt"  # default: EMA when the run kept one
    assert result.dropped == ["aad"]
    assert result.onnx_exporter == "torchscript"
    assert result.max_abs_diff["safetensors"] <= 1e-6 and result.max_abs_diff["onnx"] <= 1e-4
    log = out.getvalue()
    assert "EMA weights" in log and "dropped (training only): aad" in log
    assert log.count("logits equal the checkpoint's: max abs diff") == 3
    assert "eval images of digits" in log
    ema_tensors = _check_round_trip(cnn_run, tmp_path / "ema", "student_ema", "torchscript")

    # --weights best exports best.pt's student, which differs from the EMA
    result = export_run(
        cnn_run,
        formats="safetensors,timm,onnx",
        weights="best",
        out=tmp_path / "best",
        onnx_exporter="torchscript",
        stream=io.StringIO(),
    )
    assert result.weights == "best"
    best_tensors = _check_round_trip(cnn_run, tmp_path / "best", "student", "torchscript")
    floats = [k for k in ema_tensors if ema_tensors[k].is_floating_point()]
    assert any(not torch.equal(ema_tensors[k], best_tensors[k]) for k in floats)


def test_token_student_round_trip_dynamo_onnx(vit_run, tmp_path):
    out = io.StringIO()
    result = export_run(vit_run, formats=["safetensors", "timm", "onnx"], out=tmp_path / "exp", stream=out)
    assert result.weights == "best"  # no EMA in this run
    assert result.onnx_exporter == "dynamo"  # torch's default exporter works offline
    assert "dynamo exporter, dynamic batch axis" in out.getvalue()
    _check_round_trip(vit_run, tmp_path / "exp", "student", "dynamo")


def test_cli_default_formats_and_json(cnn_run, tmp_path, capsys):
    code = main(["export", str(cnn_run), "--weights", "last", "--out", str(tmp_path / "e"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["weights"] == "last" and sorted(result["files"]) == ["safetensors", "timm"]
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["config.json", "model.pth", "model.safetensors"]
    last = load_weights_file(cnn_run / "last.pt")["student"]
    exported = load_file(str(tmp_path / "e" / "model.safetensors"))
    assert all(torch.equal(exported[k], last[k]) for k in last)
    assert "max abs diff" in captured.err


def test_default_output_directory_is_run_export(cnn_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(cnn_run, run)
    export_run(run, formats=["timm"], stream=io.StringIO())
    assert (run / "export" / "model.pth").is_file() and (run / "export" / "config.json").is_file()
    # a second export to the same directory leaves no file of the first behind
    export_run(run, formats=["safetensors"], weights="best", stream=io.StringIO())
    assert sorted(p.name for p in (run / "export").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize(
    "setup,kwargs,message",
    [
        ("not_a_run", {}, "not a crossdistill run directory"),
        ("missing", {}, "does not exist"),
        ("no_best", {}, "has no best.pt; pass --weights last"),
        ("run", {"formats": ["safetensors", "onxx"]}, "unknown export format 'onxx'"),
        ("run", {"weights": "emma"}, "unknown --weights 'emma'"),
        ("vit", {"weights": "ema"}, "has no EMA weights"),
    ],
)
def test_errors_say_what_to_do(cnn_run, vit_run, tmp_path, setup, kwargs, message):
    if setup == "not_a_run":
        target = tmp_path / "empty"
        target.mkdir()
    elif setup == "missing":
        target = tmp_path / "nothing-here"
    elif setup == "no_best":
        target = tmp_path / "partial"
        target.mkdir()
        shutil.copy(cnn_run / "config.yaml", target / "config.yaml")
        shutil.copy(cnn_run / "last.pt", target / "last.pt")
        config = (target / "config.yaml").read_text()
        (target / "config.yaml").write_text(config.replace("ema_decay: 0.5", "ema_decay: null"))
    elif setup == "vit":
        target = vit_run
    else:
        target = cnn_run
    with pytest.raises(CrossDistillError, match=re.escape(message)):
        export_run(target, out=tmp_path / "out", stream=io.StringIO(), **kwargs)


def test_missing_onnx_is_an_install_hint(cnn_run, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    code = main(["export", str(cnn_run), "--format", "onnx", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'crossdistill[onnx]'" in err and "onnxruntime" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "model.onnx").exists()


def test_cli_format_typo_is_one_line(cnn_run, capsys):
    code = main(["export", str(cnn_run), "--format", "safetensor"])
    err = capsys.readouterr().err
    assert code == 2 and "Did you mean: safetensors?" in err and "Traceback" not in err


KILLED_MID_EXPORT = """import os, signal, sys
from pathlib import Path
import torch
import crossdistill
from crossdistill.export import export_onnx

def half_then_killed(model, args, f, **kwargs):
    with open(f, "wb") as handle:
        handle.write(b"half an onnx file")
    os.kill(os.getpid(), signal.SIGKILL)

print(crossdistill.__file__, flush=True)
torch.onnx.export = half_then_killed
export_onnx(torch.nn.Linear(4, 2), torch.zeros(2, 4), Path(sys.argv[1]), "torchscript")
"""


def test_a_kill_mid_onnx_export_leaves_the_previous_file_whole(tmp_path):
    import crossdistill

    path = tmp_path / "model.onnx"
    path.write_bytes(b"the previous export")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_EXPORT, str(path)], capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert killed.stdout.strip() == crossdistill.__file__  # the child ran these sources
    assert path.read_bytes() == b"the previous export"


def test_a_failed_onnx_export_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from crossdistill.export import export_onnx

    def half_then_fails(model, args, f, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half an onnx file")
        raise RuntimeError("unsupported operator")

    path = tmp_path / "model.onnx"
    path.write_bytes(b"the previous export")
    monkeypatch.setattr(torch.onnx, "export", half_then_fails)
    with pytest.raises(
        CrossDistillError,
        match=r"^ONNX export failed \(torchscript exporter\): RuntimeError: "
        r"unsupported operator\. Export safetensors/timm instead",
    ):
        export_onnx(torch.nn.Linear(4, 2), torch.zeros(2, 4), path, "torchscript")
    assert path.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_the_same_weights_export_to_the_same_bytes(cnn_run, tmp_path):
    # safetensors writes its metadata in a hash map's random order: without sorting, the same export had a
    # different SHA-256 each time (several orders within one process)
    exports = [tmp_path / str(i) for i in range(6)]
    for out in exports:
        export_run(cnn_run, formats="safetensors", weights="last", out=out, stream=io.StringIO())
    files = {(out / "model.safetensors").read_bytes() for out in exports}
    assert len(files) == 1
    with safe_open(str(exports[0] / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt" and set(metadata) == {"format", "architecture", "num_classes"}


def test_sorted_metadata_keeps_every_tensor_and_pads_the_header():
    from safetensors.torch import save

    state = {"b": torch.arange(5.0), "a": torch.ones(2, 3, dtype=torch.float16), "c": torch.tensor([7])}
    metadata = {str(k): "v" * k for k in range(12)}
    data = sorted_metadata(save(state, metadata=metadata))
    header_size = int.from_bytes(data[:8], "little")
    assert header_size % 8 == 0
    assert list(json.loads(data[8 : 8 + header_size])["__metadata__"]) == sorted(metadata)
    loaded = safetensors.torch.load(data)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    without_metadata = safetensors.torch.load(sorted_metadata(save(state)))
    assert all(torch.equal(without_metadata[k], state[k]) for k in state)


def test_files_of_the_users_own_in_out_are_refused_and_kept(cnn_run, tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.json").write_text('{"model_type": "my-own-model"}')
    (own / "notes.txt").write_text("mine")
    with pytest.raises(CrossDistillError, match=r"config.json was not written by crossdistill export: export to"):
        export_run(cnn_run, formats="safetensors", out=own, stream=io.StringIO())
    assert (own / "config.json").read_text() == '{"model_type": "my-own-model"}'
    assert sorted(p.name for p in own.iterdir()) == ["config.json", "notes.txt"]

    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    (weights_only / "model.pth").write_bytes(b"mine")
    with pytest.raises(CrossDistillError, match=r"holds model.pth, which no earlier crossdistill export there lists"):
        export_run(cnn_run, formats="safetensors,timm", out=weights_only, stream=io.StringIO())
    assert (weights_only / "model.pth").read_bytes() == b"mine"


def test_a_failed_re_export_leaves_the_previous_export_whole(cnn_run, tmp_path, monkeypatch):
    # the sidecar was deleted first and the new files written in place: a full disk left model files without
    # their config.json, which plain timm's local-dir: loader needs
    out = tmp_path / "exp"
    export_run(cnn_run, formats="safetensors,timm", weights="last", out=out, stream=io.StringIO())
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise CrossDistillError("no space left on the device while writing config.json")

    monkeypatch.setattr("crossdistill.export.write_sidecar", disk_full)
    with pytest.raises(CrossDistillError, match="no space left"):
        export_run(cnn_run, formats="safetensors,timm", weights="best", out=out, stream=io.StringIO())
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # its staging folder removed too
    export_run(cnn_run, formats="safetensors", weights="best", out=out, stream=io.StringIO())  # and it exports again
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # model.pth: not this one's


def _disk_full_when_writing(monkeypatch, name: str) -> None:
    real_open = files._open_temporary

    def open_temporary(fd, tmp):
        if os.path.basename(tmp).startswith(f".{name}."):
            os.close(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(fd, tmp)

    monkeypatch.setattr(files, "_open_temporary", open_temporary)


def test_a_full_disk_names_the_export_s_file_not_its_staging_copy(cnn_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "exp"
    export_run(cnn_run, formats="safetensors", out=out, stream=io.StringIO())
    _disk_full_when_writing(monkeypatch, "model.safetensors")
    cases = [(out, "the previous version of this file is intact"), (tmp_path / "new", "the file was not written")]
    for target, kept in cases:
        assert main(["export", str(cnn_run), "--format", "safetensors", "--out", str(target)]) == 2
        assert capsys.readouterr().err == (
            f"crossdistill: error: no space left on the device while writing {target / 'model.safetensors'}; {kept}. "
            "Free some space (or pass --out on another disk) and run the export again.\n"
        )
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not (tmp_path / "new").exists()


def test_a_failed_export_to_a_new_directory_leaves_no_directory(cnn_run, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise CrossDistillError("no space left on the device while writing config.json")

    monkeypatch.setattr("crossdistill.export.write_sidecar", disk_full)
    with pytest.raises(CrossDistillError, match="no space left"):
        export_run(cnn_run, formats="safetensors", out=tmp_path / "new", stream=io.StringIO())
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_checkpoint_with_nan_weights_is_refused(cnn_run, tmp_path):
    # a damaged file: its NaN weights gave finite logits on CPU and passed the logits check, "checked"
    run = tmp_path / "damaged"
    shutil.copytree(cnn_run, run)
    state = torch.load(run / "best.pt", weights_only=True)
    key = next(k for k, v in state["student"].items() if v.is_floating_point() and v.dim() == 4)
    state["student"][key][0, 0] = float("nan")
    torch.save(state, run / "best.pt")
    with pytest.raises(CrossDistillError, match=r"best.pt: 1 of the model's \d+ floating-point tensors hold NaN"):
        export_run(run, formats="safetensors", weights="best", out=tmp_path / "out", stream=io.StringIO())
    assert not (tmp_path / "out").exists()
