"""Tests of crossdistill.data: datasets, archives + cache, subsets, transforms (CPU, no network)."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from crossdistill.config import DataConfig
from crossdistill.data import DATASETS, DataBundle, balanced_subset, build_data, evaluated_split
from crossdistill.data import archive as archive_module
from crossdistill.data.datasets import DIGITS_MEAN, DIGITS_STD, digits_arrays, validation_split
from crossdistill.errors import CrossDistillError

CIFAR_TARBALL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10_jpg.tar.gz"

STUDENT = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.95,
    "crop_mode": "center",
}
CLASSES = ["cat", "dog"]


# ---------------------------------------------------------------- helpers / fixtures


def _image(label: int, index: int, size: tuple[int, int] = (12, 10)) -> Image.Image:
    """A PNG-safe image whose red channel encodes the label and green channel the index."""
    w, h = size
    rng = np.random.default_rng(1000 * label + index)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    arr[0, 0, 0] = 50 + 100 * label
    arr[0, 0, 1] = index
    return Image.fromarray(arr)


def make_tree(root: Path, per_class: int = 3, sizes=None, splits=("train", "test"), classes=CLASSES) -> Path:
    for split in splits:
        for label, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = sizes[(label * per_class + i) % len(sizes)] if sizes else (12, 10)
                _image(label, i, size).save(d / f"{i:04d}.png")
    return root


def make_tar(src: Path, out: Path, top: str | None = None) -> Path:
    mode = "w:gz" if out.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(out, mode) as tar:
        for path in sorted(src.rglob("*")):  # includes directory entries, like `tar czf`
            rel = path.relative_to(src).as_posix()
            tar.add(path, arcname=f"{top}/{rel}" if top else rel, recursive=False)
    return out


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def png_bytes(label: int = 0, index: int = 0) -> bytes:
    buf = io.BytesIO()
    _image(label, index).save(buf, format="PNG")
    return buf.getvalue()


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


def raw_pixels(ds) -> list[np.ndarray]:
    saved, ds.transform = ds.transform, None
    try:
        return [np.asarray(ds[i][0]) for i in range(len(ds))]
    finally:
        ds.transform = saved


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "tree")


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def folder_cfg(root, cache_dir=None, **kw) -> DataConfig:
    return DataConfig(dataset="folder", root=str(root), cache_dir=str(cache_dir) if cache_dir else None, **kw)


# ---------------------------------------------------------------- registry


def test_registry_names():
    assert DATASETS.names() == ["cifar10", "cifar100", "digits", "folder"]


def test_unknown_dataset_suggests():
    with pytest.raises(CrossDistillError, match=r"unknown dataset 'cifar1'.*Did you mean: .*cifar10"):
        build_data(DataConfig(dataset="cifar1"), STUDENT)


# ---------------------------------------------------------------- digits


def test_digits_bundle():
    b = build_data(DataConfig(img_size=32), STUDENT)
    assert isinstance(b, DataBundle)
    assert b.num_classes == 10 and b.classes == [str(i) for i in range(10)]
    assert (len(b.train), len(b.eval)) == (1437, 360)
    assert b.mean == DIGITS_MEAN and b.std == DIGITS_STD  # dataset stats beat the student's
    # stratified: every class holds ~20 % of its images in the test split
    train_counts = np.bincount(b.train.targets, minlength=10)
    test_counts = np.bincount(b.eval.targets, minlength=10)
    assert np.all(np.abs(test_counts / (train_counts + test_counts) - 0.2) < 0.01)

    x, y = b.train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)
    batch = torch.stack([b.eval[i][0] for i in range(0, 360, 3)])
    assert batch.shape == (120, 3, 32, 32)
    assert abs(batch.mean().item()) < 0.15 and 0.8 < batch.std().item() < 1.2  # normalised
    assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 0], batch[:, 2])  # grey -> RGB


def test_digits_split_is_deterministic_and_scaled():
    images, labels = digits_arrays()
    images2, labels2 = digits_arrays()
    assert np.array_equal(images["train"], images2["train"]) and np.array_equal(labels["test"], labels2["test"])
    assert images["train"].dtype == np.uint8 and images["train"].shape == (1437, 8, 8, 3)
    assert images["train"].max() == 255 and images["train"].min() == 0


def test_digits_mean_std_constant_matches_train_split():
    images, _ = digits_arrays()
    x = images["train"].astype(np.float64) / 255.0
    np.testing.assert_allclose(DIGITS_MEAN, x.mean(axis=(0, 1, 2)), atol=1e-4)
    np.testing.assert_allclose(DIGITS_STD, x.std(axis=(0, 1, 2)), atol=1e-4)


def test_digits_rejects_unknown_split():
    with pytest.raises(CrossDistillError, match="data.eval_split='val'.*train, test"):
        build_data(DataConfig(eval_split="val"), STUDENT)


def test_mean_std_override():
    b = build_data(DataConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), STUDENT)
    assert b.mean == (0.5, 0.5, 0.5) and b.std == (0.25, 0.25, 0.25)
    norm = [t for t in b.eval.transform.transforms if isinstance(t, T.Normalize)][0]
    assert torch.allclose(torch.as_tensor(norm.mean), torch.tensor([0.5] * 3))


# ---------------------------------------------------------------- subsets


def test_train_subset_balanced_and_fixed():
    cfg = DataConfig(train_subset=50, eval_subset=25)
    a, b = build_data(cfg, STUDENT), build_data(cfg, STUDENT)
    assert (len(a.train), len(a.eval)) == (50, 25)
    assert np.all(np.bincount(a.train.targets, minlength=10) == 5)
    eval_counts = np.bincount(a.eval.targets, minlength=10)
    assert eval_counts.max() - eval_counts.min() <= 1
    assert a.train.targets == b.train.targets and np.array_equal(a.train.images, b.train.images)
    assert np.array_equal(a.eval.images, b.eval.images)


def test_subset_too_large():
    with pytest.raises(CrossDistillError, match="data.train_subset=5000 .*1437"):
        build_data(DataConfig(train_subset=5000), STUDENT)


def test_balanced_subset_with_a_small_class():
    targets = [0] * 100 + [1] * 3 + [2] * 50
    idx = balanced_subset(targets, 30)
    counts = np.bincount(np.asarray(targets)[idx], minlength=3)
    assert len(set(idx)) == 30
    assert counts[1] == 3 and sorted([counts[0], counts[2]]) == [13, 14]  # the small class runs out
    assert balanced_subset(targets, 30) == idx


def test_val_fraction_carves_a_fixed_class_balanced_split_out_of_training():
    full = build_data(DataConfig(), STUDENT)
    cfg = DataConfig(val_fraction=0.1)
    a, b = build_data(cfg, STUDENT), build_data(cfg, STUDENT)
    per_class = np.bincount(full.train.targets, minlength=10)
    val_counts = np.bincount(a.eval.targets, minlength=10)
    assert val_counts.tolist() == [max(1, round(0.1 * n)) for n in per_class]  # per class, rounded
    assert len(a.train) + len(a.eval) == len(full.train) == 1437  # carved out of training, not the test split
    assert np.array_equal(a.eval.images, b.eval.images) and a.train.targets == b.train.targets  # fixed
    train_idx, val_idx = validation_split(full.train.targets, 0.1, seed=0)
    assert not set(train_idx) & set(val_idx)
    assert np.array_equal(a.eval.images, full.train.images[val_idx])  # val images are training images
    assert np.array_equal(a.train.images, full.train.images[train_idx])  # the rest, in their order
    assert a.eval.transform is not None and a.eval.transform is not a.train.transform  # eval transforms on val
    assert evaluated_split(cfg) == "val" and evaluated_split(DataConfig()) == "test"


def test_val_split_does_not_follow_train_seed_or_subset_and_moves_with_val_seed():
    cfg = DataConfig(val_fraction=0.2)
    val = build_data(cfg, STUDENT).eval.images
    subset = build_data(DataConfig(val_fraction=0.2, train_subset=300), STUDENT)
    assert np.array_equal(subset.eval.images, val) and len(subset.train) == 300
    other_seed = build_data(DataConfig(val_fraction=0.2, val_seed=1), STUDENT).eval.images
    assert not np.array_equal(other_seed, val)


def test_validation_split_keeps_one_per_class_and_refuses_to_empty_a_class():
    train, val = validation_split([0] * 10 + [1] * 3, 0.01)
    assert len(val) == 2 and sorted(train + val) == list(range(13)) and train == sorted(train)
    with pytest.raises(CrossDistillError, match="leaves no training image of class 1"):
        validation_split([0] * 10 + [1], 0.5)


def test_val_fraction_outside_zero_one_is_a_config_error():
    from crossdistill.config import build_config
    from crossdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="'data.val_fraction': must be in \\(0, 1\\)"):
        build_config({"student": {"name": "resnet18"}, "data": {"val_fraction": 1.0}})


# ---------------------------------------------------------------- folder: directory


def test_folder_directory(tree):
    b = build_data(folder_cfg(tree, img_size=16), STUDENT)
    assert b.classes == CLASSES and b.num_classes == 2
    assert (len(b.train), len(b.eval)) == (6, 6)
    assert b.mean == STUDENT["mean"] and b.std == STUDENT["std"]  # folder: the student's stats
    for ds in (b.train, b.eval):
        for px, (x, y) in zip(raw_pixels(ds), (ds[i] for i in range(len(ds)))):
            assert x.shape == (3, 16, 16) and x.dtype == torch.float32
            assert px[0, 0, 0] == 50 + 100 * y  # the label matches the class directory


def test_folder_directory_val_fraction_takes_val_from_the_train_directory(tree):
    b = build_data(folder_cfg(tree, img_size=16, val_fraction=0.3), STUDENT)
    assert (len(b.train), len(b.eval)) == (4, 2) and sorted(b.eval.targets) == [0, 1]
    assert all("/train/" in path for path, _ in b.eval.samples)


def test_folder_directory_corrupt_file(tree):
    (tree / "test" / "dog" / "0001.png").write_bytes(b"not an image")
    b = build_data(folder_cfg(tree), STUDENT)
    bad = [i for i, (p, _) in enumerate(b.eval.samples) if p.endswith("dog/0001.png")][0]
    with pytest.raises(CrossDistillError, match=r"dog/0001\.png"):
        b.eval[bad]


def test_folder_missing_root(tmp_path):
    with pytest.raises(CrossDistillError, match=r"nope' does not exist.*<root>/<split>/<class>/<image>"):
        build_data(folder_cfg(tmp_path / "nope"), STUDENT)
    with pytest.raises(CrossDistillError, match="needs data.root"):
        build_data(DataConfig(dataset="folder"), STUDENT)


def test_folder_missing_split(tmp_path):
    root = make_tree(tmp_path / "t", splits=("train",))
    with pytest.raises(CrossDistillError, match=r"has no 'test' directory \(found: train\).*<split>/<class>"):
        build_data(folder_cfg(root), STUDENT)


def test_folder_empty_split(tmp_path):
    root = make_tree(tmp_path / "t", splits=("train",))
    (root / "test" / "cat").mkdir(parents=True)
    (root / "test" / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(CrossDistillError, match=r"no images found under .*test"):
        build_data(folder_cfg(root), STUDENT)


def test_folder_class_mismatch(tmp_path):
    root = make_tree(tmp_path / "t")
    make_tree(root, splits=("test",), classes=["cat", "dog", "eel"])
    with pytest.raises(CrossDistillError, match=r"different class.*only in test: \['eel'\]"):
        build_data(folder_cfg(root), STUDENT)


# ---------------------------------------------------------------- folder: archive


@pytest.mark.parametrize("name,top", [("data.tar.gz", None), ("data.tgz", "mydata"), ("data.tar", "mydata")])
def test_archive_matches_directory(tmp_path, tree, cache, name, top):
    archive = make_tar(tree, tmp_path / name, top=top)
    d = build_data(folder_cfg(tree, img_size=16), STUDENT)
    a = build_data(folder_cfg(archive, cache, img_size=16), STUDENT)
    assert a.classes == d.classes and a.num_classes == 2
    for ds_a, ds_d in ((a.train, d.train), (a.eval, d.eval)):
        assert ds_a.targets == ds_d.targets
        for pa, pd in zip(raw_pixels(ds_a), raw_pixels(ds_d)):
            assert pa.dtype == np.uint8 and np.array_equal(pa, pd)
    for i in range(len(a.eval)):  # eval transforms are deterministic
        assert torch.equal(a.eval[i][0], d.eval[i][0]) and a.eval[i][1] == d.eval[i][1]


def test_archive_cache_is_reused(tmp_path, tree, cache, monkeypatch, capsys):
    archive = make_tar(tree, tmp_path / "data.tar.gz")
    first = build_data(folder_cfg(archive, cache), STUDENT)
    metas = list(cache.glob("archives/*/meta.json"))
    assert len(metas) == 1 and list(metas[0].parent.glob("*.npz"))
    assert not list(cache.rglob("*.tmp"))
    assert capsys.readouterr().out == ""  # library code prints nothing on stdout

    def no_tar(*args, **kwargs):
        raise AssertionError("the archive was read again instead of the cache")

    monkeypatch.setattr(tarfile, "open", no_tar)
    second = build_data(folder_cfg(archive, cache), STUDENT)
    assert second.train.targets == first.train.targets
    assert np.array_equal(second.train.images, first.train.images)


def test_archive_cache_key_follows_the_file(tmp_path, tree, cache):
    archive = make_tar(tree, tmp_path / "data.tar")
    build_data(folder_cfg(archive, cache), STUDENT)
    make_tree(tree, per_class=4)  # one more image per class; rewrite the archive in place
    make_tar(tree, archive)
    b = build_data(folder_cfg(archive, cache), STUDENT)
    assert len(b.train) == 8
    assert len(list(cache.glob("archives/*/meta.json"))) == 2


def test_archive_mixed_sizes(tmp_path, cache):
    sizes = [(12, 10), (7, 9), (20, 5)]
    tree = make_tree(tmp_path / "t", sizes=sizes)
    archive = make_tar(tree, tmp_path / "mixed.tar.gz")
    for _ in range(2):  # decode, then from the cache
        b = build_data(folder_cfg(archive, cache, img_size=16), STUDENT)
        assert isinstance(b.train.images, list)
        expected = [np.asarray(_image(y, i % 3, sizes[(y * 3 + i % 3) % 3])) for i, y in enumerate(b.train.targets)]
        for got, want in zip(raw_pixels(b.train), expected):
            assert np.array_equal(got, want)
        assert all(b.train[i][0].shape == (3, 16, 16) for i in range(len(b.train)))


def _bad_member(tar: tarfile.TarFile, kind: str) -> str:
    if kind in ("dotdot", "absolute"):
        name = "../evil.png" if kind == "dotdot" else "/abs.png"
        add_bytes(tar, name, png_bytes())
        return name
    info = tarfile.TarInfo("train/cat/link.png")
    info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    info.linkname = "/etc/passwd" if kind == "symlink" else ("train/cat/0000.png" if kind == "hardlink" else "")
    tar.addfile(info)
    return info.name


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "fifo"])
def test_archive_unsafe_members_refused(tmp_path, cache, kind):
    work = tmp_path / "work"
    work.mkdir()
    archive = work / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            for label, cls in enumerate(CLASSES):
                add_bytes(tar, f"{split}/{cls}/0000.png", png_bytes(label))
        name = _bad_member(tar, kind)
    why = {"dotdot": "contains '..'", "absolute": "absolute path", "fifo": "fifo"}.get(kind, "is a link")
    before = files_under(tmp_path)
    with pytest.raises(CrossDistillError, match="refusing archive.*" + name.replace(".", r"\.") + ".*" + why):
        build_data(folder_cfg(archive, cache), STUDENT)
    assert files_under(tmp_path) == before  # nothing extracted, nothing cached
    assert not (tmp_path / "evil.png").exists() and not (work.parent / "evil.png").exists()


def corrupt_archive(tmp_path: Path) -> Path:
    """A two-class archive with one image per class and split, plus an undecodable test/dog/broken.jpg."""
    archive = tmp_path / "corrupt.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            for label, cls in enumerate(CLASSES):
                add_bytes(tar, f"{split}/{cls}/0000.png", png_bytes(label))
        add_bytes(tar, "test/dog/broken.jpg", b"\xff\xd8\xff garbage")
    return archive


def test_archive_corrupt_member(tmp_path, cache):
    archive = corrupt_archive(tmp_path)
    with pytest.raises(CrossDistillError, match=r"archive member 'test/dog/broken\.jpg'"):
        build_data(folder_cfg(archive, cache), STUDENT)
    assert not cache.exists() or not files_under(cache)


def test_archive_missing_split_and_not_a_tar(tmp_path, cache):
    tree = make_tree(tmp_path / "t", splits=("train", "val"))
    archive = make_tar(tree, tmp_path / "d.tar.gz")
    with pytest.raises(CrossDistillError, match=r"no 'test' split \(found: train, val\)"):
        build_data(folder_cfg(archive, cache), STUDENT)
    b = build_data(folder_cfg(archive, cache, eval_split="val"), STUDENT)  # cached; other split
    assert len(b.eval) == 6
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(CrossDistillError, match="cannot read .*junk.tar.gz.* as a tar archive"):
        build_data(folder_cfg(junk, cache), STUDENT)


def test_archive_without_layout(tmp_path, cache):
    archive = tmp_path / "flat.tar"
    with tarfile.open(archive, "w") as tar:
        add_bytes(tar, "cat/0000.png", png_bytes())
        add_bytes(tar, "notes.txt", b"hello")
    with pytest.raises(CrossDistillError, match=r"no images in the expected layout <split>/<class>/<image>"):
        build_data(folder_cfg(archive, cache), STUDENT)


def test_archive_skips_hidden_files(tmp_path, tree, cache):
    archive = tmp_path / "mac.tar"
    make_tar(tree, archive)
    with tarfile.open(archive, "a") as tar:
        add_bytes(tar, "train/cat/._0000.png", b"AppleDouble junk")
    b = build_data(folder_cfg(archive, cache), STUDENT)
    assert len(b.train) == 6


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_files(tmp_path, name, folder):
    with pytest.raises(CrossDistillError) as info:
        build_data(DataConfig(dataset=name, root=str(tmp_path)), STUDENT)
    msg = str(info.value)
    assert str(tmp_path / folder) in msg and "data.download=true" in msg and "data.root" in msg


def test_cifar_partial_files(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(CrossDistillError, match="data.download=true"):
        build_data(DataConfig(dataset="cifar10", root=str(tmp_path)), STUDENT)


# ---------------------------------------------------------------- transforms


def test_transforms_follow_config():
    plain = build_data(DataConfig(img_size=32), STUDENT)
    assert not any(isinstance(t, T.ColorJitter) for t in plain.train.transform.transforms)
    resize = [t for t in plain.eval.transform.transforms if isinstance(t, T.Resize)][0]
    assert resize.size == 33 and resize.interpolation == T.InterpolationMode.BICUBIC  # floor(32 / 0.95)

    cfg = DataConfig(img_size=32, color_jitter=0.4, re_prob=0.25, crop_pct=0.875, interpolation="bilinear")
    aug = build_data(cfg, STUDENT)
    names = [type(t).__name__ for t in aug.train.transform.transforms]
    assert "ColorJitter" in names and "RandomErasing" in names and "RandomResizedCropAndInterpolation" in names
    resize = [t for t in aug.eval.transform.transforms if isinstance(t, T.Resize)][0]
    assert resize.size == 36 and resize.interpolation == T.InterpolationMode.BILINEAR  # floor(32 / 0.875)
    assert aug.train[0][0].shape == (3, 32, 32)


# ---------------------------------------------------------------- the real CIFAR-10 tarball


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_TARBALL.exists(), reason=f"{CIFAR_TARBALL} not present")
def test_real_cifar10_tarball(tmp_path):
    cfg = folder_cfg(CIFAR_TARBALL, tmp_path / "cache", img_size=32, train_subset=200, eval_subset=100)
    b = build_data(cfg, STUDENT)
    assert b.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert (len(b.train), len(b.eval)) == (200, 100)
    assert np.all(np.bincount(b.train.targets, minlength=10) == 20)
    assert b.train.images.shape == (200, 32, 32, 3) and b.eval.images.dtype == np.uint8
    assert b.eval[0][0].shape == (3, 32, 32)
    full = build_data(folder_cfg(CIFAR_TARBALL, tmp_path / "cache"), STUDENT)  # from the cache
    assert (len(full.train), len(full.eval)) == (50000, 10000)
    mean = full.train.images.reshape(-1, 3).mean(axis=0) / 255.0
    np.testing.assert_allclose(mean, (0.4913, 0.4821, 0.4465), atol=2e-3)  # README's train mean


@pytest.mark.parametrize("policy", ["rand-m10-mstd0-inc1", "rand-m0-mstd0", "augmix-m10-w3"])
def test_auto_augment_posterize_zero_bits(policy):
    """timm maps some magnitudes to 0 posterize bits, which recent Pillow rejects: must give black."""
    b = build_data(DataConfig(auto_augment=policy), STUDENT)
    ra = [t for t in b.train.transform.transforms if hasattr(t, "ops")][0]
    ops = [op for op in ra.ops if op.name.startswith("Posterize")]
    assert ops
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    for op in ops:
        op.prob, op.magnitude_std = 1.0, 0.0
        out = np.asarray(op(img))
        assert out.shape == (8, 8, 3)
    zero_bits = [op for op in ops if op.level_fn(op.magnitude, op.hparams)[0] == 0]
    assert zero_bits and all(np.asarray(op(img)).max() == 0 for op in zero_bits)
    torch.manual_seed(0)
    assert all(b.train[i][0].shape == (3, 32, 32) for i in range(40))


def test_folder_directory_skip_corrupt_replaces_the_image_and_warns_once(tree, caplog):
    (tree / "test" / "dog" / "0001.png").write_bytes(b"not an image")
    b = build_data(folder_cfg(tree, skip_corrupt=True), STUDENT)
    paths = [p for p, _ in b.eval.samples]
    bad = [i for i, p in enumerate(paths) if p.endswith("dog/0001.png")][0]
    with caplog.at_level("WARNING", logger="crossdistill.data"):
        x, y = b.eval[bad]
        x_again, _ = b.eval[bad]
    replacement = b.eval[(bad + 1) % len(paths)]
    assert torch.equal(x, replacement[0]) and y == replacement[1] and torch.equal(x, x_again)
    warnings = [r.getMessage() for r in caplog.records if "dog/0001.png" in r.getMessage()]
    assert len(warnings) == 1 and "replaced by the next image" in warnings[0]


def test_archive_skip_corrupt_drops_the_member_and_the_cache_remembers(tmp_path, cache, caplog):
    archive = corrupt_archive(tmp_path)
    with caplog.at_level("WARNING", logger="crossdistill.data"):
        b = build_data(folder_cfg(archive, cache, skip_corrupt=True), STUDENT)
    assert (len(b.train), len(b.eval)) == (2, 2)
    assert any(
        "skipped 1 image(s)" in r.getMessage() and "test/dog/broken.jpg" in r.getMessage() for r in caplog.records
    )
    # the decoded cache exists now; without skip_corrupt it is still an error, not a smaller dataset
    with pytest.raises(
        CrossDistillError,
        match=r"1 image\(s\) that cannot be decoded: 'test/dog/broken\.jpg'; "
        r"set data.skip_corrupt=true",
    ):
        build_data(folder_cfg(archive, cache), STUDENT)


# ---------------------------------------------------------------- issue 13: nothing silently altered or blown up


def test_archive_member_over_the_size_limit_is_refused_unread(tmp_path, cache):
    """A member whose header claims 1 GiB is refused before reading: here its data is not even there."""
    image = png_bytes()
    small = tarfile.TarInfo("train/cat/0000.png")
    small.size = len(image)
    huge = tarfile.TarInfo("train/cat/huge.png")
    huge.size = 1024**3
    archive = tmp_path / "huge.tar.gz"
    with gzip.open(archive, "wb") as out:  # tar blocks written by hand: 4 kB follow the 1 GiB header
        out.write(small.tobuf() + image.ljust(-(-len(image) // 512) * 512, b"\0") + huge.tobuf() + b"\0" * 4096)
    with pytest.raises(
        CrossDistillError,
        match=r"archive member 'train/cat/huge\.png' of '.*huge\.tar\.gz' as an "
        r"image: it is 1073741824 bytes, more than the 268435456 allowed for "
        r"one image file \(crossdistill.data.archive.MAX_MEMBER_BYTES\); "
        r"downscale or compress it",
    ):
        build_data(folder_cfg(archive, cache), STUDENT)


def test_archive_member_over_the_size_limit_is_skipped_with_skip_corrupt(tmp_path, tree, cache, monkeypatch):
    archive = make_tar(tree, tmp_path / "data.tar")
    with tarfile.open(archive, "a") as tar:
        add_bytes(tar, "train/cat/big.png", png_bytes() + b"\0" * 4000)  # still a decodable PNG
    monkeypatch.setattr(archive_module, "MAX_MEMBER_BYTES", 4000)
    with pytest.raises(CrossDistillError, match=r"'train/cat/big\.png'.*4[0-9]{3} bytes, more than the 4000 allowed"):
        build_data(folder_cfg(archive, cache), STUDENT)
    b = build_data(folder_cfg(archive, cache, skip_corrupt=True), STUDENT)
    assert len(b.train) == 6


@pytest.mark.parametrize("target", [".", "..", "../..", "../../.."])
def test_folder_link_back_to_an_ancestor_is_not_followed(tree, caplog, target):
    """A link loop in train/cat multiplied the class about 40 times (and '..' pulled in the other classes)."""
    (tree / "train" / "cat" / "loop").symlink_to(target, target_is_directory=True)
    with caplog.at_level("WARNING", logger="crossdistill.data"):
        b = build_data(folder_cfg(tree), STUDENT)
    assert (len(b.train), b.train.targets) == (6, [0, 0, 0, 1, 1, 1])
    assert [Path(p).name for p, _ in b.train.samples] == ["0000.png", "0001.png", "0002.png"] * 2
    assert all("/loop" not in p for p, _ in b.train.samples)
    assert any("train/cat/loop" in r.getMessage() and "link loop" in r.getMessage() for r in caplog.records)


def test_folder_links_count_each_real_file_once(tmp_path, tree):
    outside = tmp_path / "outside"
    (outside / "more").mkdir(parents=True)
    _image(0, 7).save(outside / "more" / "0007.png")
    _image(0, 8).save(outside / "0008.png")
    cat = tree / "train" / "cat"
    (cat / "a_more").symlink_to(outside / "more", target_is_directory=True)  # two links to one directory
    (cat / "b_more").symlink_to(outside / "more", target_is_directory=True)
    (cat / "sub").mkdir()
    (cat / "sub" / "again").symlink_to(outside / "more", target_is_directory=True)
    (cat / "0008.png").symlink_to(outside / "0008.png")  # a link to a file outside the tree still counts
    (cat / "copy.png").symlink_to(cat / "0000.png")  # a second name for a file already counted
    b = build_data(folder_cfg(tree), STUDENT)
    names = sorted(Path(p).relative_to(cat).as_posix() for p, y in b.train.samples if y == 0)
    assert names == ["0000.png", "0001.png", "0002.png", "0008.png", "a_more/0007.png"]


def test_folder_link_to_an_inner_directory_keeps_the_real_path(tree):
    cat = tree / "train" / "cat"
    (cat / "z" / "inner").mkdir(parents=True)
    _image(0, 5).save(cat / "z" / "inner" / "0005.png")
    (cat / "a_link").symlink_to(cat / "z" / "inner", target_is_directory=True)
    b = build_data(folder_cfg(tree), STUDENT)
    assert [Path(p).relative_to(cat).as_posix() for p, y in b.train.samples if y == 0] == [
        "0000.png",
        "0001.png",
        "0002.png",
        "z/inner/0005.png",
    ]


@pytest.mark.parametrize("kind", ["directory", "archive"])
@pytest.mark.parametrize("empty_split", ["train", "test"])
def test_folder_empty_class_directory_is_named_as_empty(tmp_path, cache, kind, empty_split):
    """It was reported as a class 'only in' the other split."""
    root = make_tree(tmp_path / "t")
    other = "test" if empty_split == "train" else "train"
    make_tree(root, splits=(other,), classes=["eel"])
    (root / empty_split / "eel").mkdir()
    if kind == "archive":  # with its directory entries, as `tar czf` writes them
        root = make_tar(root, tmp_path / "t.tar.gz")
    with pytest.raises(
        CrossDistillError,
        match=rf"^class directory '{empty_split}/eel' of '.*t(\.tar\.gz)?' has no "
        rf"images, but the '{other}' split has images of that class; add "
        r"images there or remove the class from both splits$",
    ):
        build_data(folder_cfg(root, cache), STUDENT)


def test_folder_unreadable_directory_is_an_error(tree, monkeypatch):
    """os.walk skipped a directory it could not list: its images were silently missing."""
    unreadable = tree / "train" / "cat" / "sub"
    unreadable.mkdir()
    _image(0, 5).save(unreadable / "0005.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(
        CrossDistillError,
        match=r"^cannot list directory '.*train/cat/sub' of the dataset: .*"
        r"Permission denied.*; make it readable or move it out of data.root$",
    ):
        build_data(folder_cfg(tree), STUDENT)


def test_archive_cache_of_an_older_decoder_is_decoded_again(tmp_path, tree, cache, monkeypatch):
    """Version-1 caches hold 16-bit images clipped to 0/255: they must not be reused."""
    archive = make_tar(tree, tmp_path / "data.tar")
    build_data(folder_cfg(archive, cache), STUDENT)
    meta_file = next(cache.glob("archives/*/meta.json"))
    meta = json.loads(meta_file.read_text())
    meta["version"] = 1
    meta_file.write_text(json.dumps(meta))
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **kw: opened.append(a) or real_open(*a, **kw))
    build_data(folder_cfg(archive, cache), STUDENT)
    assert len(opened) == 1 and json.loads(meta_file.read_text())["version"] == archive_module.CACHE_VERSION


def test_a_full_disk_while_caching_a_decoded_archive_is_one_line(tmp_path, tree, cache, monkeypatch):
    archive = make_tar(tree, tmp_path / "data.tar")

    def full_disk(handle, **arrays):
        handle.write(b"PK")  # a few bytes of the zip, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(CrossDistillError) as raised:
        build_data(folder_cfg(archive, cache), STUDENT)
    folder = next(cache.glob("archives/*"))
    assert str(raised.value) == (
        f"no space left on the device while writing {folder / 'split0.npz'}; the file was not "
        "written. Free some space (or point data.cache_dir at another disk) and run the "
        "command again."
    )
    assert not list(folder.iterdir())  # no meta.json (the cache is not complete), no temporary file
