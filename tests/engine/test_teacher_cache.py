"""Teacher-output cache: bitwise-equal runs in fp32, no teacher forward once filled, key, damage handling."""

import io
import json

import numpy as np
import pytest
import torch

from conftest import tiny_run
from crossdistill.config import build_config
from crossdistill.engine import Trainer
from crossdistill.engine.teacher_cache import TeacherCache, cache_key, key_digest
from crossdistill.engine.teacher_runner import TeacherRunner
from crossdistill.errors import CrossDistillError
from crossdistill.models import FINAL, Teacher, TeacherOutputs


class CountingForward:
    """Counts forward passes of the teacher model on batches (test_vit; the student is a ResNet). The set-up's
    size check of a fixed-size model (one zero image, models.factory.check_input_size) is no teacher output."""

    def __init__(self, monkeypatch):
        from timm.models.vision_transformer import VisionTransformer

        self.calls = 0
        original = VisionTransformer.forward_features

        def counted(model, x, *args, **kwargs):
            self.calls += x.shape[0] > 1
            return original(model, x, *args, **kwargs)

        monkeypatch.setattr(VisionTransformer, "forward_features", counted)


SMALL = {"train_subset": 128, "eval_subset": 50}  # 4 steps per epoch


def _run(tmp_path, name, out=None, **train):
    raw = tiny_run(tmp_path, train={"epochs": 2, "run_name": name, **train}, data=SMALL)
    trainer = Trainer(build_config(raw), out=out if out is not None else io.StringIO())
    summary = trainer.fit()
    losses = [{k: v for k, v in row.items() if k.startswith("train_")} for row in summary.history]
    weights = {k: v.detach().clone() for k, v in trainer.distiller.state_dict().items()}
    return trainer, losses, weights


def _assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uncached(tmp_path_factory):
    """The reference: the same run without a cache."""
    _, losses, weights = _run(tmp_path_factory.mktemp("plain"), "plain")
    return losses, weights


def test_cached_runs_are_bitwise_equal_and_the_second_does_not_run_the_teacher(tmp_path, monkeypatch, uncached):
    cache = str(tmp_path / "cache")
    counter = CountingForward(monkeypatch)
    out = io.StringIO()
    _, losses, weights = _run(tmp_path, "fill", out, teacher_cache=cache, teacher_cache_dtype="fp32")
    assert counter.calls > 0
    assert losses == uncached[0]  # the filling run: same floats
    _assert_bitwise(weights, uncached[1])
    assert "teacher cache, epoch 1: 0 samples read, 128 computed" in out.getvalue()

    counter.calls = 0
    out = io.StringIO()
    _, losses, weights = _run(tmp_path, "read", out, teacher_cache=cache, teacher_cache_dtype="fp32")
    assert counter.calls == 0  # every teacher output came from the cache
    assert losses == uncached[0]
    _assert_bitwise(weights, uncached[1])
    assert "teacher cache, epoch 2: 128 samples read, 0 computed" in out.getvalue()

    # another student and method hyper-parameter, and another batch size: the same cache, no teacher
    raw = tiny_run(
        tmp_path,
        train={
            "epochs": 1,
            "run_name": "sweep",
            "teacher_cache": cache,
            "teacher_cache_dtype": "fp32",
            "batch_size": 64,
        },
        method_args={"kappa": 0.02},
        data=SMALL,
    )
    Trainer(build_config(raw), out=io.StringIO()).fit()
    assert counter.calls == 0


def test_with_gradient_accumulation_cached_runs_are_bitwise_equal_to_the_uncached_run(tmp_path):
    """Each micro-batch reads (or stores) its own samples' rows."""
    cache, accum = str(tmp_path / "cache"), {"epochs": 1, "grad_accum_steps": 2}
    _, plain_losses, plain_weights = _run(tmp_path, "plain", **accum)
    for name, expected in (("fill", "0 samples read, 128 computed"), ("read", "128 samples read, 0 computed")):
        out = io.StringIO()
        trainer, losses, weights = _run(tmp_path, name, out, teacher_cache=cache, teacher_cache_dtype="fp32", **accum)
        assert trainer.steps_per_epoch == 2
        assert losses == plain_losses
        _assert_bitwise(weights, plain_weights)
        assert f"teacher cache, epoch 1: {expected} by the teacher" in out.getvalue()


def test_fp16_cache_reads_back_what_the_filling_run_used(tmp_path):
    cache = str(tmp_path / "cache")
    _, fill_losses, fill_weights = _run(tmp_path, "a", teacher_cache=cache, epochs=1)
    _, read_losses, read_weights = _run(tmp_path, "b", teacher_cache=cache, epochs=1)
    assert fill_losses == read_losses
    _assert_bitwise(fill_weights, read_weights)
    (folder,) = (tmp_path / "cache").iterdir()
    assert np.load(folder / "epoch-0000" / "embedding.npy", mmap_mode="r").dtype == np.float16
    assert json.loads((folder / "key.json").read_text())["key"]["compute"]["store"] == "fp16"


def test_each_epoch_stores_the_teacher_on_that_epochs_augmentations(tmp_path):
    """Sample i is a new augmentation in every epoch (engine/sampling.py), so its stored rows differ per
    epoch: a cache serving epoch 0's rows in every epoch would distill from one view of each image."""
    cache = tmp_path / "cache"
    _run(tmp_path, "fill", teacher_cache=str(cache), teacher_cache_dtype="fp32")
    (folder,) = cache.iterdir()
    rows = [np.load(folder / f"epoch-{epoch:04d}" / "embedding.npy") for epoch in (0, 1)]
    for epoch in (0, 1):
        assert (np.load(folder / f"epoch-{epoch:04d}" / "embedding.check.npy") >= 0).all()
    row_differs = ~np.isclose(rows[0], rows[1], rtol=1e-4, atol=1e-5).all(axis=1)
    # 8x8 digits cropped at scale 0.7-1 have few distinct crops: a few samples draw the same one twice
    assert row_differs.mean() > 0.75, row_differs.mean()


def _key(cfg, teacher, **changes):
    kwargs = dict(
        num_train=128,
        data_mean=(0.3,) * 3,
        data_std=(0.4,) * 3,
        device_type="cpu",
        amp_dtype=None,
        channels_last=False,
        store_dtype="fp16",
    )
    kwargs.update(changes)
    return key_digest(cache_key(cfg, teacher, **kwargs))


def test_the_key_changes_with_teacher_seed_augmentation_and_data(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8)
    teacher = Teacher(model)
    cfg = build_config(tiny_run(tmp_path))
    base = _key(cfg, teacher)
    assert _key(cfg, teacher) == base  # deterministic
    assert _key(cfg, Teacher(model)) == base

    param = next(model.parameters())
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(1e-3)
    assert _key(cfg, teacher) != base  # other teacher weights
    with torch.no_grad():
        param.copy_(saved)
    assert _key(cfg, teacher) == base

    for section, change in [
        ("train", {"seed": 8}),
        ("data", {"hflip": 0.5}),
        ("data", {"scale": [0.5, 1.0]}),
        ("data", {"img_size": 48}),
        ("data", {"train_subset": 128}),
        ("data", {"auto_augment": "rand-m9-mstd0.5"}),
        ("data", {"val_fraction": 0.1}),
    ]:
        changed = build_config(tiny_run(tmp_path, **{section: change}))
        assert _key(changed, teacher) != base, change
    assert _key(cfg, teacher, amp_dtype=torch.bfloat16) != base
    assert _key(cfg, teacher, store_dtype="fp32") != base
    assert _key(cfg, Teacher(model, (0.3,) * 3, (0.4,) * 3, (0.5,) * 3, (0.5,) * 3)) != base  # re-normalised input
    # what does not decide the teacher's output is not in the key
    for section, change in [
        ("train", {"batch_size": 64, "epochs": 5}),
        ("optim", {"lr": 0.1}),
        ("student", {"name": "resnet18"}),
        ("method_args", {"kappa": 0.5}),
        ("data", {"num_workers": 2, "eval_subset": 50}),
    ]:
        assert _key(build_config(tiny_run(tmp_path, **{section: change})), teacher) == base, change
    split = build_config(tiny_run(tmp_path, data={"val_fraction": 0.1}))
    assert _key(build_config(tiny_run(tmp_path, data={"val_fraction": 0.1, "val_seed": 1})), teacher) != _key(
        split, teacher
    )


def _filled_cache(tmp_path):
    cache = tmp_path / "cache"
    _run(tmp_path, "fill", teacher_cache=str(cache), teacher_cache_dtype="fp32", epochs=1)
    (folder,) = cache.iterdir()
    return cache, folder


def test_damaged_rows_and_files_are_detected_and_rebuilt(tmp_path, monkeypatch):
    cache, folder = _filled_cache(tmp_path)
    _, reference, ref_weights = _run(tmp_path, "ref", teacher_cache=str(cache), teacher_cache_dtype="fp32", epochs=1)
    data = np.load(folder / "epoch-0000" / "embedding.npy", mmap_mode="r+")
    check = np.load(folder / "epoch-0000" / "embedding.check.npy", mmap_mode="r")
    row = int(np.flatnonzero(check >= 0)[0])
    data[row, :3] += 1.0  # silent corruption of one stored row
    data.flush()
    del data
    counter = CountingForward(monkeypatch)
    out = io.StringIO()
    _, losses, weights = _run(tmp_path, "rows", out, teacher_cache=str(cache), teacher_cache_dtype="fp32", epochs=1)
    assert "1 row(s) fail their checksum; recomputing them" in out.getvalue()
    assert counter.calls == 1  # only the batch holding the damaged row
    assert losses == reference
    _assert_bitwise(weights, ref_weights)

    path = folder / "epoch-0000" / "embedding.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated file (disk full, killed copy)
    out = io.StringIO()
    _, losses, _ = _run(tmp_path, "truncated", out, teacher_cache=str(cache), teacher_cache_dtype="fp32", epochs=1)
    assert "is damaged" in out.getvalue() and "rebuilding it" in out.getvalue()
    assert losses == reference
    assert np.load(path, mmap_mode="r").shape == (128, 64)


def test_a_directory_holding_another_key_is_refused(tmp_path):
    cache, folder = _filled_cache(tmp_path)
    record = json.loads((folder / "key.json").read_text())
    record["digest"] = "0" * 64
    (folder / "key.json").write_text(json.dumps(record))
    with pytest.raises(CrossDistillError, match="holds outputs for another key"):
        _run(tmp_path, "other", teacher_cache=str(cache), teacher_cache_dtype="fp32", epochs=1)


def test_the_cache_is_bypassed_with_a_message_where_it_cannot_apply(tmp_path):
    out = io.StringIO()
    raw = tiny_run(tmp_path, train={"epochs": 1, "teacher_cache": str(tmp_path / "c"), "mixup": 0.8})
    trainer = Trainer(build_config(raw), out=out)
    assert trainer.teacher_cache is None and "with mixup/cutmix the teacher sees batches mixed" in out.getvalue()

    out = io.StringIO()
    raw = tiny_run(
        tmp_path,
        method="fitnet",
        method_args={"img_size": 32},
        train={"epochs": 1, "teacher_cache": str(tmp_path / "c"), "run_name": "fitnet"},
    )
    trainer = Trainer(build_config(raw), out=out)
    assert trainer.teacher_cache is None and "reads teacher stage features" in out.getvalue()
    assert trainer.teacher_runner.request.stages  # the engine still runs FitNet's teacher, uncached
    assert not (tmp_path / "c").exists()


def test_every_shipped_method_declares_what_it_reads_from_the_teacher():
    """The contract: each method's request, and whether the engine may cache it, come from the method itself."""
    import timm

    from crossdistill.distillers import METHODS, build_distiller

    expected = {
        "rsd": ("embedding",),
        "rsd_logits": ("logits",),
        "kd": ("logits",),
        "dkd": ("logits",),
        "dist": ("logits",),
        "ofa": ("logits",),
        "rsd_ofa": ("embedding", "logits"),
        "sd_kd": (),
        "sd_dkd": (),
        "fitnet": (),
        "rkd": ("embedding",),
        "cc": ("embedding",),
        "crd": ("embedding",),
        "at": (),
        "vanilla": (),
    }
    assert set(METHODS.names()) == set(expected)
    for name, cached in expected.items():
        torch.manual_seed(0)
        teacher = None
        if METHODS.get(name).needs_teacher:
            teacher = Teacher(timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8))
        args = {"img_size": 32} if name in ("fitnet", "ofa", "rsd_ofa") else {}
        distiller = build_distiller(name, timm.create_model("test_resnet", num_classes=10), teacher, args)
        request = distiller.teacher_request()
        assert (distiller.teacher_request().outputs if distiller.teacher_cacheable else ()) == cached, name
        assert request.empty == (name == "vanilla"), name
    sdd = build_distiller(
        "sd_kd",
        timm.create_model("test_resnet", num_classes=10),
        Teacher(timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8)),
        {},
    )
    assert sdd.teacher_request().stages == (FINAL,)  # its regions: the teacher's final map through its head


def test_the_runner_gives_ordinary_tensors_computed_in_eval_and_inference_mode():
    import timm

    from crossdistill.distillers import build_distiller

    teacher = Teacher(timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8))
    distiller = build_distiller("rsd", timm.create_model("test_resnet", num_classes=10), teacher, {})
    teacher.model.train()
    seen = {}
    original = distiller.compute_teacher

    def spy(images):
        seen["inference"], seen["training"] = torch.is_inference_mode_enabled(), teacher.model.training
        return original(images)

    distiller.compute_teacher = spy
    out = TeacherRunner(distiller).compute(torch.randn(4, 3, 32, 32))
    assert seen == {"inference": True, "training": False}
    assert out.embedding.shape == (4, teacher.dim) and not out.embedding.is_inference()
    assert out.logits is None and out.stages == []  # only what RSD asked for
    with pytest.raises(ValueError, match="not cacheable"):
        TeacherRunner(
            build_distiller("fitnet", timm.create_model("test_resnet", num_classes=10), teacher, {"img_size": 32}),
            cache=object(),
        )


def test_lookup_validates_indices(tmp_path):
    cache = TeacherCache(tmp_path, {"teacher": {"name": "t"}}, ("embedding",), {"embedding": 4}, 10, log=lambda m: None)
    cache.begin_epoch(0)
    fill = lambda x: TeacherOutputs(embedding=torch.ones(x.shape[0], 4))  # noqa: E731
    out = cache.lookup(torch.tensor([1, 5]), torch.zeros(2, 3, 8, 8), fill)
    assert torch.equal(out.embedding, torch.ones(2, 4)) and out.embedding.dtype == torch.float32
    with pytest.raises(RuntimeError, match="out of range"):
        cache.lookup(torch.tensor([10, 1]), torch.zeros(2, 3, 8, 8), fill)
    with pytest.raises(RuntimeError, match="indices for a batch of 3"):
        cache.lookup(torch.tensor([1, 2]), torch.zeros(3, 3, 8, 8), fill)
    assert cache.epoch_complete(0) is False
    cache.close()


def test_a_setup_failure_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 creates the cache files; if that fails, the other ranks must not wait for it in a barrier:
    the flag every rank agrees on makes them all stop (here the flags of a 2-rank run are simulated)."""
    key = {"teacher": {"name": "t"}}
    args = (tmp_path, key, ("embedding",), {"embedding": 4}, 10)
    TeacherCache(*args, log=lambda m: None)  # the directory, with this key's key.json
    other_key = {"teacher": {"name": "t"}, "seed": 1}
    clash = tmp_path / f"t-{key_digest(other_key)[:16]}"
    clash.mkdir()
    (clash / "key.json").write_text(json.dumps({"digest": "0" * 64, "key": {}}))
    agreed = []

    def agree(ok):  # rank 0's flag is False: the all-reduced answer every rank gets
        agreed.append(ok)
        return False

    with pytest.raises(CrossDistillError, match="holds outputs for another key"):
        TeacherCache(tmp_path, other_key, ("embedding",), {"embedding": 4}, 10, agree=agree, log=lambda m: None)
    assert agreed == [False]
    with pytest.raises(CrossDistillError, match="failed on rank 0"):  # another rank: its own work succeeded
        TeacherCache(
            tmp_path,
            other_key,
            ("embedding",),
            {"embedding": 4},
            10,
            is_main=False,
            agree=lambda ok: False,
            log=lambda m: None,
        )


def test_a_method_that_needs_indices_gets_them_with_and_without_the_cache(tmp_path, monkeypatch):
    """CRD's memory bank is keyed by sample: every training batch brings the samples' dataset indices, in the
    loader's order (each sample once per epoch), whether the teacher cache is on or not; the cached run ends
    bitwise equal (the cache rows are stored in fp32 here)."""
    from crossdistill.distillers.crd import CRD

    seen: list[list[int]] = []
    original = CRD.forward

    def recording(self, images, target, teacher, indices=None):
        seen.append(None if indices is None else indices.tolist())
        return original(self, images, target, teacher, indices)

    monkeypatch.setattr(CRD, "forward", recording)
    crd = {"method": "crd", "method_args": {"num_negatives": 16, "feat_dim": 8}}

    def run(name, **train):
        raw = tiny_run(tmp_path, **crd, train={"epochs": 2, "run_name": name, **train}, data=SMALL)
        trainer = Trainer(build_config(raw), out=io.StringIO())
        trainer.fit()
        return {k: v.detach().clone() for k, v in trainer.distiller.state_dict().items()}

    plain = run("plain")
    batches, seen[:] = list(seen), []
    cached = run("cached", teacher_cache=str(tmp_path / "cache"), teacher_cache_dtype="fp32")
    assert seen == batches and len(batches) == 2 * 4
    for epoch in (batches[:4], batches[4:]):
        assert sorted(i for batch in epoch for i in batch) == list(range(128))
    assert batches[:4] != batches[4:]  # reshuffled per epoch
    _assert_bitwise(plain, cached)
    assert plain["memory.student"].shape == (128, 8)


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_loader_workers_started_without_fork_read_the_cache(tmp_path, context):
    # a sweep's workers are spawned, so their loaders' workers are too (and forkserver is Python 3.14's default):
    # the dataset is pickled, and the cache's logging lambda made every such run fail ("Can't pickle local object")
    from crossdistill.engine.loaders import build_train_loader

    images = [(torch.full((3, 4, 4), float(i)), i % 2) for i in range(8)]
    cache = TeacherCache(
        tmp_path, {"teacher": {"name": "t"}}, ("logits",), {"logits": 2}, len(images), log=lambda m: None
    )
    cache.begin_epoch(0)
    stored = torch.arange(16.0).reshape(8, 2)
    cache.lookup(torch.arange(4), torch.zeros(4, 3, 4, 4), lambda x: TeacherOutputs(logits=stored[:4]))
    _, sampler, _, loader = build_train_loader(images, seed=0, batch_size=8, num_workers=1, teacher_cache=cache)
    loader.multiprocessing_context = context
    sampler.set_epoch(0)
    (_, _, index, rows, ok) = next(iter(loader))
    assert ok.tolist() == [int(i) < 4 for i in index]  # rows the main process stored are seen, the others missing
    assert torch.equal(rows["logits"][ok].float(), stored[index[ok]])
    cache.close()
