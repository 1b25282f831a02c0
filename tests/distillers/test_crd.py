"""CRD: config, negatives (other classes, deterministic per sample), the memory bank and Z, loss terms as the
engine computes them, training across architectures, parameter counts, checkpointed state."""

import json

import pytest
import torch
import yaml

from conftest import adamw_training, distill, run_teacher, tiny_batch, tiny_pair, tiny_resnet, tiny_run, tiny_vit
from crossdistill import METHODS, build_distiller
from crossdistill.checkpoint import save_atomic
from crossdistill.cli import main
from crossdistill.distillers import method_config
from crossdistill.distillers.crd import CRD, CRDConfig, draw_negatives
from crossdistill.errors import ConfigError, CrossDistillError
from crossdistill.losses import contrast_exp, crd_nce_loss
from crossdistill.models import forward_model
from crossdistill.params import count_method_parameters

DIRECTION_IDS = ["cnn->token", "token->cnn"]
TARGETS = [i % 10 for i in range(60)]  # 60 training samples of 10 classes


def crd(args=None, student_fn=tiny_resnet, teacher_fn=tiny_vit, targets=TARGETS, seed=3):
    student, teacher = tiny_pair(student_fn, teacher_fn)
    distiller = build_distiller("crd", student, teacher, {"num_negatives": 32, "feat_dim": 16, **(args or {})})
    distiller.bind_training_set(targets, seed)
    return distiller


def test_registry_and_reference_defaults():
    assert METHODS.get("crd") is CRD and CRD.config_cls is CRDConfig and CRD.needs_indices
    cfg = method_config("crd", {})  # OFA train.py: --crd-feat-dim 128 --crd-k 16384 --crd-momentum 0.5 ...
    assert (cfg.feat_dim, cfg.num_negatives, cfg.momentum, cfg.temperature, cfg.weight, cfg.w_gt) == (
        128,
        16384,
        0.5,
        0.07,
        1.0,
        1.0,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ({"feat_dim": 0}, "'method_args.feat_dim': must be >= 1, got 0"),
        ({"num_negatives": 0}, "'method_args.num_negatives': must be >= 1, got 0"),
        ({"temperature": 0.0}, "'method_args.temperature': must be a finite number > 0.0, got 0.0"),
        ({"momentum": 1.0}, "'method_args.momentum': must be < 1, got 1.0"),
        ({"momentum": -0.1}, "'method_args.momentum': must be a finite number >= 0.0, got -0.1"),
        ({"weight": float("nan")}, "'method_args.weight'"),
        ({"w_gt": -1.0}, "'method_args.w_gt'"),
        ({"k": 5}, "unknown config key 'method_args.k'"),
    ],
)
def test_bad_values_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        method_config("crd", args)


def test_needs_a_teacher_reads_its_embedding_and_the_cache_can_store_it():
    with pytest.raises(ConfigError, match="method 'crd' needs a teacher"):
        method_config("crd", {}, teacher=None)
    distiller = crd()
    assert distiller.teacher_request().outputs == ("embedding",) and distiller.teacher_cacheable


# ---------------------------------------------------------------- negatives


def test_negatives_are_samples_of_other_classes_reaching_all_of_them():
    distiller = crd({"num_negatives": 4000})
    indices = torch.tensor([0, 7, 13, 59])
    negatives = draw_negatives(distiller.memory, indices, 4000, seed=3, epoch=0)
    assert negatives.shape == (4, 4000) and negatives.dtype == torch.int64
    labels = torch.tensor(TARGETS)
    for row, index in zip(negatives, indices):
        assert not (labels[row] == labels[index]).any()
        others = {i for i in range(60) if TARGETS[i] != TARGETS[index]}
        assert set(row.tolist()) == others  # uniform with replacement: 4000 draws over 54 samples reach them all
        counts = torch.bincount(row, minlength=60)[sorted(others)].float()
        assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()


def test_negatives_depend_on_seed_epoch_and_index_only():
    memory = crd().memory
    batch = draw_negatives(memory, torch.tensor([5, 9, 21]), 32, seed=3, epoch=2)
    alone = draw_negatives(memory, torch.tensor([21]), 32, seed=3, epoch=2)
    assert torch.equal(batch[2], alone[0])  # whatever else is in the batch
    assert not torch.equal(draw_negatives(memory, torch.tensor([21]), 32, seed=3, epoch=3), alone)
    assert not torch.equal(draw_negatives(memory, torch.tensor([21]), 32, seed=4, epoch=2), alone)
    assert not torch.equal(batch[0], batch[1])


def test_a_training_set_of_one_class_is_a_clear_error():
    with pytest.raises(CrossDistillError, match="the training set has 1 class; use a training set of at least 2"):
        crd(targets=[3] * 20)


# ---------------------------------------------------------------- the memory bank, Z, the loss terms


def test_terms_are_the_nce_loss_on_the_banks_and_the_banks_move_towards_the_embeddings():
    distiller = crd({"weight": 0.5, "w_gt": 0.25, "momentum": 0.3, "temperature": 0.1})
    memory = distiller.memory
    student_bank, teacher_bank = memory.student.clone(), memory.teacher.clone()
    assert memory.student.shape == (60, 16) and torch.equal(memory.z, torch.tensor([-1.0, -1.0]))
    x, y = tiny_batch(n=6)
    indices = torch.tensor([3, 14, 25, 36, 47, 58])
    out = distill(distiller, x, y, indices)
    assert set(out.losses) == {"ce", "crd"}
    with torch.no_grad():
        f_s = distiller.embed_s(forward_model(distiller.student, x).embedding)
        f_t = distiller.embed_t(run_teacher(distiller.teacher, x).embedding)
        sample = torch.cat([indices[:, None], draw_negatives(memory, indices, 32, 3, 0)], 1)
        exp_s = contrast_exp(f_s, teacher_bank[sample], 0.1)
        exp_t = contrast_exp(f_t, student_bank[sample], 0.1)
        z = torch.stack([exp_s.mean(), exp_t.mean()]) * 60
        expected = 0.5 * (crd_nce_loss(exp_s / z[0], 60) + crd_nce_loss(exp_t / z[1], 60))
        moved = 0.3 * student_bank[indices] + 0.7 * f_s
    assert torch.allclose(f_s.norm(dim=1), torch.ones(6)) and torch.allclose(f_t.norm(dim=1), torch.ones(6))
    assert torch.allclose(out.losses["crd"], expected, rtol=1e-5)
    assert torch.allclose(memory.z, z, rtol=1e-5)
    assert torch.allclose(memory.student[indices], moved / moved.norm(dim=1, keepdim=True), atol=1e-6)
    untouched = torch.ones(60, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(memory.student[untouched], student_bank[untouched])
    assert torch.equal(memory.teacher[untouched], teacher_bank[untouched])
    z_first = memory.z.clone()
    distill(distiller, *tiny_batch(seed=5, n=6), torch.tensor([0, 1, 2, 4, 5, 6]))
    assert torch.equal(memory.z, z_first)  # fixed on the first batch


def test_banks_and_z_are_in_the_state_dict_and_load_back_exactly():
    distiller = crd()
    distill(distiller, *tiny_batch(n=4), torch.tensor([1, 2, 3, 4]))
    state = distiller.memory.state_dict()
    assert set(state) == {"student", "teacher", "z"}  # the class tables are rebuilt from the data
    fresh = crd(seed=9)
    assert not torch.equal(fresh.memory.student, distiller.memory.student)
    fresh.memory.load_state_dict(state)
    for key in state:
        assert torch.equal(fresh.memory.state_dict()[key], state[key])


def test_the_banks_start_the_same_from_the_same_seed():
    assert torch.equal(crd(seed=5).memory.teacher, crd(seed=5).memory.teacher)
    bound = 1 / (16 / 3) ** 0.5
    assert crd().memory.student.abs().max() <= bound


def test_without_indices_or_a_bound_training_set_the_forward_says_why():
    with pytest.raises(ValueError, match="needs the samples' dataset indices"):
        distill(crd(), *tiny_batch(n=4))
    student, teacher = tiny_pair()
    unbound = build_distiller("crd", student, teacher, {"num_negatives": 8})
    with pytest.raises(ValueError, match="call bind_training_set"):
        distill(unbound, *tiny_batch(n=4), torch.arange(4))


def test_terms_are_fp32_under_bf16_autocast():
    distiller = crd()
    x, y = tiny_batch(n=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distill(distiller, x, y, torch.arange(4))
    assert out.losses["crd"].dtype == torch.float32 and torch.isfinite(out.loss)
    assert distiller.memory.student.dtype == torch.float32
    out.loss.backward()


# ---------------------------------------------------------------- training across architectures


@pytest.mark.parametrize(
    "student_fn, teacher_fn, lr", [(tiny_resnet, tiny_vit, 1e-3), (tiny_vit, tiny_resnet, 3e-4)], ids=DIRECTION_IDS
)
def test_adamw_steps_lower_the_term_and_leave_the_teacher_alone(student_fn, teacher_fn, lr):
    """The term is noisier than the other methods' (the banks move with every step; the token student
    oscillates at 1e-3), so the token student steps at a lower rate."""
    distiller = crd({}, student_fn, teacher_fn).train()
    terms, totals = adamw_training(distiller, "crd", *tiny_batch(n=8), steps=16, lr=lr, indices=torch.arange(0, 16, 2))
    assert terms[-1] < 0.5 * terms[0], terms
    assert totals[-1] < 0.5 * totals[0], totals


# ---------------------------------------------------------------- parameters


def test_params_counts_the_two_embedding_heads_and_no_bank(capsys):
    info = count_method_parameters("crd", "vit_small_patch16_224", "resnet18", num_classes=100)
    assert info["extra_by_module"] == {"embed_s": 512 * 128 + 128, "embed_t": 384 * 128 + 128, "memory": 0}
    code = main(["params", "--method", "crd", "--teacher", "vit_small_patch16_224", "--student", "resnet18", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["extra_trainable_parameters"] == 114944


# ---------------------------------------------------------------- the command line


def test_train_and_dry_run_from_the_command_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    raw = tiny_run(tmp_path, method="kd", train={"epochs": 1})
    config.write_text(yaml.safe_dump(raw))
    code = main(["train", "--config", str(config), "method=crd", "method_args.num_negatives=64", "--dry-run"])
    assert code == 0, capsys.readouterr()
    assert not (tmp_path / "runs" / "run").exists()
    code = main(["train", "--config", str(config), "method=crd", "method_args.num_negatives=64"])
    assert code == 0, capsys.readouterr()
    run_dir = tmp_path / "runs" / "run"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"] == "crd"
    record = json.loads((run_dir / "summary.json").read_text())["history"][-1]
    assert record["train_crd"] > 0 and torch.isfinite(torch.tensor(record["train_loss"]))
    extras = torch.load(run_dir / "last.pt", weights_only=True)["extras"]
    assert extras["memory"]["student"].shape == (256, 128) and extras["memory"]["z"].min() > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("method_args.num_negatives=0", "config key 'method_args.num_negatives': must be >= 1, got 0"),
        ("method_args.momentum=1", "config key 'method_args.momentum': must be < 1, got 1.0"),
    ],
)
def test_documented_errors_print_one_line(tmp_path, capsys, override, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run(tmp_path, method="crd", train={"epochs": 1})))
    code = main(["train", "--config", str(config), override])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and lines == [f"crossdistill: error: {message}"]
    assert not (tmp_path / "runs" / "run").exists()


def test_a_training_set_without_labels_is_a_clear_error():
    from crossdistill.engine.setup import training_targets

    class Unlabelled(torch.utils.data.Dataset):
        def __len__(self):
            return 3

    with pytest.raises(CrossDistillError, match="method 'crd' needs the class of every training sample, and this"):
        training_targets(Unlabelled(), "crd")
    assert training_targets(type("Labelled", (Unlabelled,), {"targets": [2, 0, 1]})(), "crd") == [2, 0, 1]


def test_resuming_on_another_training_set_is_a_clear_error(tmp_path, capsys):
    """The banks have a row per training sample: a resume on a training set of another size used to end in
    torch's size-mismatch traceback."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run(tmp_path, method="crd", method_args={"num_negatives": 16})))
    assert main(["train", "--config", str(config), "train.epochs=1"]) == 0
    run_dir = tmp_path / "runs" / "run"
    original = (run_dir / "last.pt").read_bytes()
    capsys.readouterr()
    state = torch.load(run_dir / "last.pt", weights_only=True)
    state["config"]["data"]["train_subset"] = 128  # past the config check (which refuses data.train_subset=128)
    save_atomic(state, run_dir / "last.pt")
    before = (run_dir / "last.pt").read_bytes()
    assert main(["train", "--resume", str(run_dir), "data.train_subset=128"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "crossdistill: error: the checkpoint's CRD memory bank has 256 rows of 128, but this run's training set has "
        "128 samples and feat_dim is 128: resume with the training set (data.*) and method_args.feat_dim the run "
        "started with"
    ]
    assert (run_dir / "last.pt").read_bytes() == before
    (run_dir / "last.pt").write_bytes(original)
    assert main(["train", "--resume", str(run_dir), "train.epochs=2"]) == 0
