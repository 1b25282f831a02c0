import math

import pytest
import yaml

from conftest import tiny_run
from crossdistill.config import RunConfig, apply_overrides, build_config, load_config
from crossdistill.distillers.rsd import RSDConfig
from crossdistill.engine.setup import check_run_config
from crossdistill.errors import ConfigError


def test_defaults_and_typed_sections(tmp_path):
    cfg = build_config(tiny_run(tmp_path))
    assert isinstance(cfg, RunConfig)
    assert cfg.train.batch_size == 32 and cfg.data.scale == (0.7, 1.0)
    assert cfg.method == "rsd" and cfg.teacher.name == "test_vit"


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    raw = tiny_run(tmp_path)
    raw["train"]["epoch"] = 3
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*epochs"):
        build_config(raw)
    with pytest.raises(ConfigError, match="unknown config key 'studnet'"):
        build_config({**tiny_run(tmp_path), "studnet": {"name": "resnet18"}})


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.batch_size=abc", r"'train.batch_size': expected int, got str"),
        ("train.batch_size=2.5", r"'train.batch_size': expected int, got float"),
        ("optim.lr=-0.1", r"'optim.lr': must be > 0"),
        ("optim.lr=.inf", r"'optim.lr': must be > 0 and finite, got inf"),
        ("optim.weight_decay=.inf", r"'optim.weight_decay': must be >= 0 and finite"),
        ("data.scale=[0.5]", r"'data.scale': expected 2 values"),
        ("train.progress=maybe", r"'train.progress': must be auto, bar, lines or off \(or true/false\), got 'maybe'"),
        ("train.progress=3", r"'train.progress': expected str or bool"),
        ("train.log_every=-1", r"'train.log_every': must be >= 0 \(0: no step lines\), got -1"),
        ("train.trackers=[tensorbord]", r"'train.trackers': unknown tracker 'tensorbord'; choose from mlflow, wandb"),
        ("train.trackers=mlflow", r"'train.trackers': expected list, got str"),
        ("method_args.kappa=-1", r"'method_args.kappa': must be >= 0"),
        ("method_args.gamma=0", r"'method_args.gamma': must be >= 1"),
        ("method_args.kapa=0.1", r"unknown config key 'method_args.kapa'.*kappa"),
        ("method=rsdd", r"unknown method 'rsdd'.*rsd"),
        ("train.amp=fp8", r"'train.amp'"),
        # --dry-run passed it, the run refused it: the check was where a dry run builds no weights
        (
            "student.checkpoint=w.pth",  # with student.pretrained: true, as the own-data fine-tune recipe sets it
            r"'student.checkpoint': set either student.pretrained or student.checkpoint, not both \(local weights: "
            r"student.pretrained=false student.checkpoint=FILE\)",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, match):
    raw = tiny_run(tmp_path)
    if override.startswith("student.checkpoint"):
        raw["student"]["pretrained"] = True
    with pytest.raises(ConfigError if "method=" not in override else Exception, match=match):
        check_run_config(build_config(apply_overrides(raw, [override])))


def test_method_needing_a_teacher_without_one(tmp_path):
    raw = tiny_run(tmp_path)
    raw["teacher"] = None
    with pytest.raises(ConfigError, match="needs a teacher"):
        check_run_config(build_config(raw))


def test_overrides_parse_yaml_values_and_create_sections(tmp_path):
    raw = apply_overrides(
        tiny_run(tmp_path),
        [
            "train.epochs=5",
            "data.scale=[0.5, 1.0]",
            "train.ema_decay=0.999",
            "method_args.kappa=0.02",
            "teacher.checkpoint=/x/y.pt",
        ],
    )
    cfg = build_config(raw)
    assert cfg.train.epochs == 5 and cfg.data.scale == (0.5, 1.0) and cfg.train.ema_decay == 0.999
    assert cfg.method_args == {"kappa": 0.02} and cfg.teacher.checkpoint == "/x/y.pt"
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.epochs"])


def test_base_inheritance_and_round_trip(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_run(tmp_path)))
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {epochs: 9}\nmethod_args: {kappa: 0.05}\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.batch_size=16"])
    assert cfg.train.epochs == 9 and cfg.train.batch_size == 16 and cfg.data.train_subset == 256
    (tmp_path / "saved.yaml").write_text(cfg.to_yaml())
    again = load_config(tmp_path / "saved.yaml")
    assert again == cfg


def rsd_recipe(tmp_path):
    raw = tiny_run(tmp_path, method_args={"weight": 0.1, "kappa": 0.01})
    (tmp_path / "rsd.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path / "rsd.yaml"


def test_a_method_given_on_the_command_line_starts_from_its_own_defaults(tmp_path):
    """`method=kd` used to keep the recipe's RSD arguments: "unknown config key 'method_args.kappa'"."""
    notes = []
    cfg = load_config(rsd_recipe(tmp_path), ["method=kd"], notes=notes)
    assert cfg.method == "kd" and cfg.method_args == {}
    check_run_config(cfg)  # kd's own defaults: nothing unknown
    assert notes == [
        "method changed from rsd to kd on the command line: the method_args of rsd (weight, kappa) are dropped and "
        "kd starts from its defaults (set method_args.KEY=VALUE to change one)"
    ]
    for overrides in (["method=kd", "method_args.temperature=2"], ["method_args.temperature=2", "method=kd"]):
        assert load_config(rsd_recipe(tmp_path), overrides).method_args == {"temperature": 2}
    notes = []
    same = load_config(rsd_recipe(tmp_path), ["method=rsd", "method_args.kappa=0.02"], notes=notes)
    assert same.method_args == {"weight": 0.1, "kappa": 0.02} and notes == []


def test_a_config_that_extends_another_method_replaces_its_method_args(tmp_path):
    rsd_recipe(tmp_path)
    (tmp_path / "kd.yaml").write_text("base: rsd.yaml\nmethod: kd\nmethod_args: {temperature: 4.0}\n")
    notes = []
    cfg = load_config(tmp_path / "kd.yaml", notes=notes)
    assert cfg.method == "kd" and cfg.method_args == {"temperature": 4.0}
    check_run_config(cfg)
    assert len(notes) == 1 and notes[0].startswith(
        f"method changed from rsd to kd in {tmp_path / 'kd.yaml'}: the method_args of rsd (weight, kappa) are dropped"
    )
    (tmp_path / "rsd2.yaml").write_text("base: rsd.yaml\nmethod: rsd\nmethod_args: {gamma: 4}\n")
    same = load_config(tmp_path / "rsd2.yaml")
    assert same.method_args == {"weight": 0.1, "kappa": 0.01, "gamma": 4}  # the same method: merged as before
    # a later base of another method replaces an earlier base's method arguments the same way
    (tmp_path / "kd_base.yaml").write_text("method: kd\n")
    (tmp_path / "two.yaml").write_text("base: [rsd.yaml, kd_base.yaml]\n")
    assert load_config(tmp_path / "two.yaml").method_args == {}


def test_base_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("student: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(path)


def test_rsd_defaults_are_the_official_ones():
    assert RSDConfig() == RSDConfig(weight=0.1, kappa=0.01, gamma=2)


def test_input_paths_become_absolute(tmp_path, monkeypatch):
    from crossdistill.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    raw = tiny_run(tmp_path)
    raw["teacher"]["checkpoint"] = "teachers/t.pt"
    raw["data"].update(dataset="folder", root="data/cifar.tar.gz")
    cfg = with_absolute_paths(build_config(raw))
    assert cfg.teacher.checkpoint == str(tmp_path / "teachers" / "t.pt")
    assert cfg.data.root == str(tmp_path / "data" / "cifar.tar.gz")
    assert cfg.data.cache_dir is None and cfg.student.checkpoint is None


# --- YAML as users write it; configs that expand to huge sizes -------------------------------------------


def test_floats_in_exponent_notation_are_floats(tmp_path):
    """PyYAML follows YAML 1.1, whose floats need a dot: ``1e-3`` was the string '1e-3'."""
    raw = tiny_run(tmp_path)
    raw["optim"]["lr"] = "LR"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw).replace("LR", "1e-3") + "method_args: {kappa: 2E-2, weight: 1e+0}\n")
    cfg = load_config(path, ["optim.min_lr=1e-6", "optim.weight_decay=5e-4", "train.ema_decay=.999"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.min_lr == 1e-6 and cfg.optim.weight_decay == 5e-4
    assert cfg.train.ema_decay == 0.999 and cfg.method_args == {"kappa": 0.02, "weight": 1.0}
    # the rest of YAML's scalars are read as before
    cfg = build_config(apply_overrides(tiny_run(tmp_path), ["train.run_name=1e", "train.epochs=3"]))
    assert cfg.train.run_name == "1e" and cfg.train.epochs == 3


def alias_bomb(levels: int = 10, width: int = 4) -> str:
    """A ~1 KB YAML mapping whose aliases expand to width**levels values (a 'billion laughs')."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "{" + ", ".join(lines) + "}"


def test_yaml_alias_bomb_is_refused_while_loading(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(
        yaml.safe_dump(tiny_run(tmp_path)) + "student:\n  name: test_resnet\n  kwargs: " + alias_bomb() + "\n"
    )
    assert path.stat().st_size < 2000
    with pytest.raises(ConfigError, match=r"bomb\.yaml expands to more than 100,000 values"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'student.kwargs' expands to more than 100,000 values"):
        apply_overrides(tiny_run(tmp_path), ["student.kwargs=" + alias_bomb()])
    # text: 10,000 characters repeated 200 times
    repeated = ", ".join(["*text"] * 200)
    path.write_text(f"text: &text {'x' * 10_000}\nstudent: {{name: test_resnet, kwargs: {{many: [{repeated}]}}}}\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml expands to more than 1,000,000 characters of text"):
        load_config(path)
    # an alias inside itself is an endless structure
    path.write_text("student: &me {name: test_resnet, kwargs: {again: *me}}\n")
    with pytest.raises(ConfigError, match="more than"):
        load_config(path)
    # a config with a few aliases is fine
    path.write_text(
        "base: base.yaml\ndata: {scale: &range [0.5, 1.0], ratio: *range}\ntrain: {epochs: &n 3, eval_every: *n}\n"
    )
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_run(tmp_path)))
    cfg = load_config(path)
    assert cfg.data.ratio == cfg.data.scale == (0.5, 1.0) and cfg.train.eval_every == cfg.train.epochs == 3


def test_text_that_is_not_a_config_gives_one_clear_line(tmp_path):
    path = tmp_path / "run.yaml"
    for content, match in [
        ("a: " + "[" * 2000 + "]" * 2000, "cannot parse .*nests"),
        ("a: " + "[" * 60 + "]" * 60, "nests mappings or lists more than 50 levels"),
        ("a: " + "1" * 5000, "cannot parse"),
        (
            "student: [a, b\ntrain: {",
            r"cannot parse .*: while parsing a flow sequence \(line 1, column 10\): "
            r"expected ',' or '\]', but got ':' \(line 2, column 6\)$",
        ),
    ]:
        path.write_text(content)
        with pytest.raises(ConfigError, match=match) as info:
            load_config(path)
        assert "\n" not in str(info.value)
    path.write_bytes(b"\x80\x04\x95 a pickle, not YAML")
    with pytest.raises(ConfigError, match="not a text"):
        load_config(path)


def test_messages_show_at_most_200_characters_of_a_value(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_config(apply_overrides(tiny_run(tmp_path), ["train.batch_size=" + "x" * 100_000]))
    assert str(info.value).startswith("config key 'train.batch_size': expected int, got str 'xxx")
    assert len(str(info.value)) < 300
    raw = tiny_run(tmp_path)
    raw["data"]["scale"] = list(range(10_000))
    with pytest.raises(ConfigError, match="expected 2 values, got 10000") as info:
        build_config(raw)
    assert len(str(info.value)) < 300
    raw = tiny_run(tmp_path)
    raw["train"]["k" * 100_000] = 1
    with pytest.raises(ConfigError, match="unknown config key") as info:
        build_config(raw)
    assert len(str(info.value)) < 300


# --- every range check of validate(): the edge it accepts, the values it refuses, its exact message ---------------


def _with(raw: dict, changes: dict) -> dict:
    """``raw`` with dotted keys set (``"train.epochs": 1``; a top-level key has no dot)."""
    for key, value in changes.items():
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node[section]
        node[name] = value
    return raw


ACCEPTED_EDGES = [
    {"train.epochs": 1},
    {"train.batch_size": 1},
    {"train.eval_batch_size": 1},
    {"train.eval_batch_size": None},
    *({"train.amp": amp} for amp in ("auto", "none", "bf16", "fp16")),
    {"train.label_smoothing": 0.0},
    {"train.label_smoothing": 0.999},
    {"train.mixup": 0.0, "train.cutmix": 0.0},
    {"train.mixup": 0.2, "train.cutmix": 1.0},
    {"train.ema_decay": None},
    {"train.ema_decay": 1e-9},
    {"train.ema_decay": 0.999999},
    {"train.eval_every": 1},
    {"train.checkpoint_every_steps": None},
    {"train.checkpoint_every_steps": 1},
    {"train.keep_step_checkpoints": 1},
    {"train.max_nonfinite_steps": 0},
    {"train.finite_check_every": None},
    {"train.finite_check_every": 1},
    {"train.teacher_cache_dtype": "fp16"},
    {"train.teacher_cache_dtype": "fp32"},
    {"train.teacher_cache": None},
    {"train.teacher_cache": "cache"},
    {"train.run_name": None},
    {"train.run_name": "a.b-c_d"},
    {"train.run_name": "..."},
    {"optim.lr": 1e-300},
    {"optim.lr": 0.5},
    {"optim.scale_lr": "none"},
    {"optim.scale_lr": "linear", "train.reference_batch": 1},
    {"train.reference_batch": None},
    {"optim.weight_decay": 0.0},
    {"optim.min_lr": 0.0},
    {"optim.warmup_epochs": 0},
    {"optim.clip_grad": None},
    {"optim.clip_grad": 1e-9},
    {"data.img_size": 8},
    {"data.scale": [1.0, 1.0]},
    {"data.scale": [1e-9, 1e-9]},
    {"data.hflip": 0.0},
    {"data.hflip": 1.0},
    {"data.re_prob": 0.0},
    {"data.re_prob": 1.0},
    {"data.train_subset": None},
    {"data.train_subset": 1},
    {"data.num_workers": 0},
    {"num_classes": None},
    {"num_classes": 2},
]


@pytest.mark.parametrize("changes", ACCEPTED_EDGES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_validate_accepts_the_edges_of_each_range(tmp_path, changes):
    cfg = build_config(_with(tiny_run(tmp_path), changes))
    for key, value in changes.items():
        *sections, name = key.split(".")
        node = cfg
        for section in sections:
            node = getattr(node, section)
        assert getattr(node, name) == (tuple(value) if isinstance(value, list) else value)


REFUSED = [
    ({"student.name": ""}, "student.name': a student model name is required (e.g. resnet18)"),
    ({"teacher.name": ""}, "teacher.name': a teacher model name is required (or set teacher: null)"),
    ({"train.epochs": 0}, "train.epochs': must be >= 1, got 0"),
    ({"train.batch_size": 0}, "train.batch_size': must be >= 1, got 0"),
    ({"train.eval_batch_size": 0}, "train.eval_batch_size': must be >= 1"),
    ({"train.amp": "fp8"}, "train.amp': must be auto, none, bf16 or fp16, got 'fp8'"),
    ({"train.label_smoothing": 1.0}, "train.label_smoothing': must be in [0, 1), got 1.0"),
    ({"train.label_smoothing": -0.1}, "train.label_smoothing': must be in [0, 1), got -0.1"),
    ({"train.mixup": -0.1}, "train.mixup': mixup and cutmix alphas must be >= 0"),
    ({"train.cutmix": -0.1}, "train.mixup': mixup and cutmix alphas must be >= 0"),
    ({"train.ema_decay": 0.0}, "train.ema_decay': must be in (0, 1), got 0.0"),
    ({"train.ema_decay": 1.0}, "train.ema_decay': must be in (0, 1), got 1.0"),
    ({"train.eval_every": 0}, "train.eval_every': must be >= 1"),
    ({"train.checkpoint_every_steps": 0}, "train.checkpoint_every_steps': must be >= 1 (or null)"),
    ({"train.keep_step_checkpoints": 0}, "train.keep_step_checkpoints': must be >= 1"),
    ({"train.max_nonfinite_steps": -1}, "train.max_nonfinite_steps': must be >= 0"),
    ({"train.finite_check_every": 0}, "train.finite_check_every': must be >= 1 (or null)"),
    ({"train.teacher_cache_dtype": "bf16"}, "train.teacher_cache_dtype': must be fp16 or fp32, got 'bf16'"),
    ({"train.teacher_cache": " \t"}, "train.teacher_cache': must be a directory path (or null)"),
    *(
        (
            {"train.run_name": name},
            "train.run_name': must be one folder name inside train.output_dir (not empty, '.' or '..', no '/'), "
            f"got {name!r}",
        )
        for name in ("", " ", ".", " . ", "..", " .. ", "a/b", "/", "a\0b")
    ),
    ({"optim.lr": 0.0}, "optim.lr': must be > 0 and finite, got 0.0"),
    ({"optim.lr": math.inf}, "optim.lr': must be > 0 and finite, got inf"),
    ({"optim.scale_lr": "sqrt"}, "optim.scale_lr': must be none or linear, got 'sqrt'"),
    ({"train.reference_batch": 0}, "train.reference_batch': must be >= 1"),
    (
        {"optim.scale_lr": "linear"},
        "optim.scale_lr': linear scaling needs train.reference_batch (the effective batch the lr was tuned for)",
    ),
    ({"optim.weight_decay": -1e-9}, "optim.weight_decay': must be >= 0 and finite, got -1e-09"),
    ({"optim.weight_decay": math.inf}, "optim.weight_decay': must be >= 0 and finite, got inf"),
    ({"optim.min_lr": -1e-9}, "optim.min_lr': must be >= 0 and finite"),
    ({"optim.min_lr": math.inf}, "optim.min_lr': must be >= 0 and finite"),
    ({"optim.warmup_epochs": -1}, "optim.warmup_epochs': must be >= 0"),
    ({"optim.clip_grad": 0.0}, "optim.clip_grad': must be > 0 (or null)"),
    ({"data.img_size": 7}, "data.img_size': must be >= 8, got 7"),
    ({"data.scale": [0.0, 0.5]}, "data.scale': must satisfy 0 < min <= max <= 1, got (0.0, 0.5)"),
    ({"data.scale": [0.6, 0.5]}, "data.scale': must satisfy 0 < min <= max <= 1, got (0.6, 0.5)"),
    ({"data.scale": [0.5, 1.5]}, "data.scale': must satisfy 0 < min <= max <= 1, got (0.5, 1.5)"),
    ({"data.hflip": -0.1}, "data.hflip': must be a probability in [0, 1]"),
    ({"data.hflip": 1.1}, "data.hflip': must be a probability in [0, 1]"),
    ({"data.re_prob": -0.1}, "data.re_prob': must be a probability in [0, 1]"),
    ({"data.re_prob": 1.1}, "data.re_prob': must be a probability in [0, 1]"),
    ({"data.train_subset": 0}, "data.train_subset': must be >= 1"),
    ({"data.num_workers": -1}, "data.num_workers': must be >= 0"),
    ({"num_classes": 1}, "num_classes': must be >= 2"),
]


@pytest.mark.parametrize("changes,message", REFUSED, ids=lambda c: repr(c)[:60])
def test_validate_refuses_each_value_out_of_range_with_its_own_message(tmp_path, changes, message):
    with pytest.raises(ConfigError) as info:
        build_config(_with(tiny_run(tmp_path), changes))
    assert str(info.value) == "config key '" + message


def test_every_input_path_becomes_absolute_and_the_rest_is_kept(tmp_path, monkeypatch):
    from crossdistill.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    raw = tiny_run(tmp_path)
    raw["student"]["checkpoint"] = "~/s.pt"
    raw["teacher"]["checkpoint"] = "t.pt"
    raw["data"].update(root="data", cache_dir="cache")
    raw["train"]["teacher_cache"] = "teachers/../tc"
    cfg = build_config(raw)
    out = with_absolute_paths(cfg)
    assert out.student.checkpoint == str(tmp_path / "home" / "s.pt")
    assert out.teacher.checkpoint == str(tmp_path / "t.pt")
    assert (out.data.root, out.data.cache_dir) == (str(tmp_path / "data"), str(tmp_path / "cache"))
    assert out.train.teacher_cache == str(tmp_path / "tc")
    # everything else as it was, and the original untouched
    relative = {"student.checkpoint", "teacher.checkpoint", "data.root", "data.cache_dir", "train.teacher_cache"}
    flat_in, flat_out = _flat(cfg.to_dict()), _flat(out.to_dict())
    assert {k: v for k, v in flat_in.items() if k not in relative} == {
        k: v for k, v in flat_out.items() if k not in relative
    }
    assert cfg == build_config(raw)

    # no teacher, no checkpoints, no cache: nothing to resolve
    raw = tiny_run(tmp_path, "vanilla")
    cfg = build_config(raw)
    assert with_absolute_paths(cfg) == cfg


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_saved_config_keeps_the_order_of_the_fields(tmp_path):
    """config.yaml is read by people: student, teacher, method first, each section in its documented order."""
    import dataclasses

    cfg = build_config(tiny_run(tmp_path))
    saved = yaml.safe_load(cfg.to_yaml())
    assert list(saved) == [f.name for f in dataclasses.fields(RunConfig)]
    for section in ("student", "data", "optim", "train"):
        assert list(saved[section]) == [f.name for f in dataclasses.fields(getattr(cfg, section))]
    assert saved["data"]["scale"] == [0.7, 1.0]  # tuples as plain YAML lists


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("train.epochs", "3", "config key 'train.epochs': expected int, got str '3'"),
        ("train.epochs", True, "config key 'train.epochs': expected int, got bool True"),
        ("train.tensorboard", 1, "config key 'train.tensorboard': expected bool, got int 1"),
        ("train.progress", 1, "config key 'train.progress': expected str or bool, got int 1"),
        ("optim.lr", "fast", "config key 'optim.lr': expected float, got str 'fast'"),
        ("optim.lr", False, "config key 'optim.lr': expected float, got bool False"),
        ("optim.opt", 3, "config key 'optim.opt': expected str, got int 3"),
        ("train.run_name", 3, "config key 'train.run_name': expected str, got int 3"),
        ("num_classes", 2.0, "config key 'num_classes': expected int, got float 2.0"),
        ("data.scale", "wide", "config key 'data.scale': expected tuple, got str 'wide'"),
        ("data.scale", [0.5, "a"], "config key 'data.scale[1]': expected float, got str 'a'"),
        ("data.mean", [0.5, 0.5], "config key 'data.mean': expected 3 values, got 2 ([0.5, 0.5])"),
        ("student.kwargs", [1], "config key 'student.kwargs': expected dict, got list [1]"),
        ("method_args", "kappa", "config key 'method_args': expected dict, got str 'kappa'"),
        ("student", "resnet18", "config key 'student': expected ModelConfig, got str 'resnet18'"),
        ("teacher", 3, "config key 'teacher': expected ModelConfig, got int 3"),
        ("data", [], "config key 'data': expected DataConfig, got list []"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key_the_type_and_the_value(tmp_path, key, value, message):
    with pytest.raises(ConfigError) as info:
        build_config(_with(tiny_run(tmp_path), {key: value}))
    assert str(info.value) == message


def test_values_are_converted_to_the_declared_types(tmp_path):
    raw = _with(
        tiny_run(tmp_path),
        {
            "optim.lr": 1,
            "data.scale": [1, 1],
            "data.mean": (0.5, 0.5, 0.5),
            "student.kwargs": {"depth": 2},
            "method_args": {"kappa": [1, "x"]},
            "train.ema_decay": None,
            "teacher.mean": None,
        },
    )
    cfg = build_config(raw)
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 1.0
    assert type(cfg.data.scale[0]) is float and cfg.data.scale == (1.0, 1.0) and cfg.data.mean == (0.5, 0.5, 0.5)
    assert cfg.student.kwargs == {"depth": 2} and cfg.student.kwargs is not raw["student"]["kwargs"]
    assert cfg.method_args == {"kappa": [1, "x"]}  # Any: as given
    assert cfg.train.ema_decay is None and cfg.teacher.mean is None


def test_the_converter_handles_every_annotation_it_names():
    """_convert is generic over annotations (no run config field uses these yet): unions of several types,
    variable-length tuples, lists; an annotation it does not know is a programming error, not a user's."""
    import typing

    from crossdistill.config import _convert

    assert _convert(3, int | str | None, "k") == 3 and _convert("a", int | str | None, "k") == "a"
    assert _convert(None, typing.Optional[typing.Union[int, str]], "k") is None
    with pytest.raises(ConfigError) as info:
        _convert(1.5, int | str | None, "k")
    assert str(info.value) == "config key 'k': expected int or str or null, got float 1.5"
    with pytest.raises(ConfigError) as info:
        _convert(1.5, typing.Union[int, str], "k")
    assert str(info.value) == "config key 'k': expected int or str, got float 1.5"
    assert _convert([1, 2, 3], tuple[float, ...], "k") == (1.0, 2.0, 3.0)
    with pytest.raises(ConfigError) as info:
        _convert([1, "x"], tuple[int, ...], "k")
    assert str(info.value) == "config key 'k[1]': expected int, got str 'x'"
    assert _convert((1, 2), list[float], "k") == [1.0, 2.0] and _convert((1, "a"), typing.List, "k") == [1, "a"]
    with pytest.raises(ConfigError) as info:
        _convert([1, "x"], list[int], "k")
    assert str(info.value) == "config key 'k[1]': expected int, got str 'x'"
    with pytest.raises(ConfigError) as info:
        _convert("ab", list[int], "k")
    assert str(info.value) == "config key 'k': expected list, got str 'ab'"
    with pytest.raises(ConfigError) as info:
        _convert({1}, tuple[int, int], "k")
    assert str(info.value) == "config key 'k': expected tuple, got set {1}"
    with pytest.raises(TypeError, match=r"unsupported annotation set\[int\] for k"):
        _convert({1}, set[int], "k")


def test_merging_configs_changes_neither_and_shares_nothing_with_them():
    """A child config over its base: the result owns every part, so editing it (overrides, the loaders that
    fill in defaults) never reaches back into a config read earlier."""
    from crossdistill.config import _deep_merge

    base = {"data": {"scale": [0.5, 1.0], "hflip": 0.5}, "train": {"epochs": 3}, "tags": ["a"]}
    child = {"data": {"ratio": [0.75, 1.0], "hflip": 0.0}, "tags": ["b"], "method_args": {"kappa": [1]}}
    merged = _deep_merge(base, child)
    assert merged == {
        "data": {"scale": [0.5, 1.0], "hflip": 0.0, "ratio": [0.75, 1.0]},
        "train": {"epochs": 3},
        "tags": ["b"],
        "method_args": {"kappa": [1]},
    }
    merged["data"]["scale"].append(2)
    merged["data"]["ratio"].append(2)
    merged["train"]["epochs"] = 9
    merged["method_args"]["kappa"].append(2)
    assert base == {"data": {"scale": [0.5, 1.0], "hflip": 0.5}, "train": {"epochs": 3}, "tags": ["a"]}
    assert child == {"data": {"ratio": [0.75, 1.0], "hflip": 0.0}, "tags": ["b"], "method_args": {"kappa": [1]}}


# --- reading YAML: each message exactly, bases, overrides, size bounds ---------------------------------------------


@pytest.mark.parametrize(
    "text,problem",
    [
        ("a: b: c", "mapping values are not allowed here (line 1, column 5)"),
        (
            "{a: 1",
            "while parsing a flow mapping (line 1, column 1): expected ',' or '}', but got '<stream end>' (line 1, "
            "column 6)",
        ),
        # a context without a place
        (
            "a:\n\tb: 1",
            "while scanning for the next token: found character '\\t' that cannot start any token (line 2, column 1)",
        ),
        # not a MarkedYAMLError: PyYAML's text spans two lines
        (
            "a: \x07",
            'unacceptable character #x0007: special characters are not allowed in "<unicode string>", position 3',
        ),
        ("a: " + "[" * 2000 + "]" * 2000, "it nests mappings or lists too deeply"),
        (
            "a: " + "1" * 5000,
            "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits; use "
            "sys.set_int_max_str_digits() to increase the limit",
        ),
        (
            "a: !!python/name:os.system x",
            "could not determine a constructor for the tag 'tag:yaml.org,2002:python/name:os.system' "
            "(line 1, column 4)",
        ),
    ],
    ids=["problem", "context-and-problem", "context-unplaced", "reader", "recursion", "digits", "tag"],
)
def test_yaml_that_cannot_be_parsed_is_one_exact_line(tmp_path, text, problem):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"cannot parse {path}: {problem}"[: len(f"cannot parse {path}: ") + 200]


def test_a_long_parse_error_is_cut_to_200_characters(tmp_path, monkeypatch):
    import crossdistill.config as config

    def fails(*args, **kwargs):
        raise ValueError("x" * 500 + "\n  y")

    monkeypatch.setattr(config.yaml, "load", fails)
    path = tmp_path / "run.yaml"
    path.write_text("a: 1")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"cannot parse {path}: " + "x" * 200


def test_the_top_level_must_be_a_mapping_and_an_empty_file_is_an_empty_config(tmp_path):
    from crossdistill.config import read_yaml

    path = tmp_path / "run.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert str(info.value) == f"{path}: the top level of a config must be a mapping"
    path.write_text("")
    assert read_yaml(str(path)) == {}
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert str(info.value) == f"cannot parse {path}: not a text (UTF-8) file; a run config is YAML"
    with pytest.raises(ConfigError) as info:
        read_yaml(tmp_path / "missing.yaml")
    assert str(info.value) == f"config file not found: {tmp_path / 'missing.yaml'}"
    with pytest.raises(ConfigError) as info:
        read_yaml(tmp_path)  # a folder is not a config file
    assert str(info.value) == f"config file not found: {tmp_path}"


def test_bases_merge_in_order_relative_to_the_file_that_names_them(tmp_path):
    from crossdistill.config import read_yaml

    (tmp_path / "common").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "common" / "root.yaml").write_text("train: {epochs: 1, seed: 1}\ndata: {hflip: 0.1}\n")
    (tmp_path / "common" / "a.yaml").write_text("base: root.yaml\ntrain: {epochs: 2, batch_size: 8}\n")
    (tmp_path / "b.yaml").write_text("train: {epochs: 3}\noptim: {lr: 0.1}\n")
    (tmp_path / "runs" / "run.yaml").write_text("base: [../common/a.yaml, ../b.yaml]\noptim: {lr: 0.2}\n")
    assert read_yaml(tmp_path / "runs" / "run.yaml") == {
        "train": {"epochs": 3, "seed": 1, "batch_size": 8},
        "data": {"hflip": 0.1},
        "optim": {"lr": 0.2},
    }


def test_a_cycle_of_bases_names_every_file_in_it(tmp_path):
    from crossdistill.config import read_yaml

    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: [c.yaml]\n")
    (tmp_path / "c.yaml").write_text("base: a.yaml\n")
    a, b, c = (str((tmp_path / f"{n}.yaml").resolve()) for n in "abc")
    with pytest.raises(ConfigError) as info:
        read_yaml(tmp_path / "a.yaml")
    assert str(info.value) == f"config files extend each other in a cycle: {a} -> {b} -> {c} -> {a}"
    (tmp_path / "c.yaml").write_text("train: {epochs: 1}\n")  # a diamond is no cycle
    (tmp_path / "a.yaml").write_text("base: [b.yaml, c.yaml]\n")
    assert read_yaml(tmp_path / "a.yaml") == {"train": {"epochs": 1}}


def test_overrides_strip_the_key_split_at_the_first_equals_and_replace_what_is_not_a_section():
    raw = {"teacher": None, "train": {"epochs": 2, "run_name": "r"}}
    out = apply_overrides(
        raw, [" train.epochs = 3", "teacher.name=vit", "train.run_name=", "data.scale=[0.5, 1]", "x=a=b", "y=[1,"]
    )
    assert out == {
        "teacher": {"name": "vit"},
        "train": {"epochs": 3, "run_name": None},
        "data": {"scale": [0.5, 1]},
        "x": "a=b",  # not YAML: the text itself
        "y": "[1,",
    }
    assert raw == {"teacher": None, "train": {"epochs": 2, "run_name": "r"}}  # the input is not changed
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, ["train.epochs"])
    assert str(info.value) == "override 'train.epochs' is not of the form key=value (e.g. train.epochs=3)"


def test_sections_and_keys_are_named_exactly():
    with pytest.raises(ConfigError) as info:
        build_config(3)
    assert str(info.value) == "config section '<root>' must be a mapping, got 3"
    with pytest.raises(ConfigError) as info:
        build_config({"student": {"name": "resnet18"}, "train": {"epoch": 3}})
    assert str(info.value) == "unknown config key 'train.epoch'. Did you mean: epochs?"
    with pytest.raises(ConfigError) as info:
        build_config({"trian": {}})
    assert str(info.value) == "unknown config key 'trian'. Did you mean: train?"
    with pytest.raises(ConfigError) as info:
        build_config({"student": {"name": "resnet18"}, "train": {"zzz": 3}})
    assert str(info.value) == "unknown config key 'train.zzz'."


def _nested(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def test_the_size_bounds_are_exact():
    from crossdistill.config import MAX_CONFIG_CHARS, MAX_CONFIG_DEPTH, MAX_CONFIG_VALUES, check_config_size

    values = (
        "x expands to more than 100,000 values, where a run config holds a few hundred: aliases (*name) or shared "
        "references repeat a part of it; write the values out plainly"
    )
    chars = (
        "x expands to more than 1,000,000 characters of text, where a run config holds a few thousand: aliases "
        "(*name) or shared references repeat a part of it; write the values out plainly"
    )
    depth = "x nests mappings or lists more than 50 levels deep (a run config needs about 4); is it a run config?"
    accepted = [
        [0] * (MAX_CONFIG_VALUES - 1),  # with the list itself: the bound
        tuple([0] * (MAX_CONFIG_VALUES - 1)),
        {i: None for i in range((MAX_CONFIG_VALUES - 1) // 2)},  # keys count too
        _nested(MAX_CONFIG_DEPTH),
        {"a": _nested(MAX_CONFIG_DEPTH - 1)},
        ["a" * (MAX_CONFIG_CHARS // 2), "b" * (MAX_CONFIG_CHARS // 2)],
        [b"a" * MAX_CONFIG_CHARS],
    ]
    for value in accepted:
        check_config_size(value, "x")
    refused = [
        ([0] * MAX_CONFIG_VALUES, values),
        (tuple([0] * MAX_CONFIG_VALUES), values),
        (set(range(MAX_CONFIG_VALUES)), values),
        (frozenset(range(MAX_CONFIG_VALUES)), values),
        ({i: None for i in range(MAX_CONFIG_VALUES // 2)}, values),
        (_nested(MAX_CONFIG_DEPTH + 1), depth),
        ({"a": _nested(MAX_CONFIG_DEPTH)}, depth),
        (((0,), _nested(MAX_CONFIG_DEPTH)), depth),
        (["a" * (MAX_CONFIG_CHARS // 2), "b" * (MAX_CONFIG_CHARS // 2 + 1)], chars),
        ({"a" * (MAX_CONFIG_CHARS + 1): 1}, chars),  # keys count too
        ([b"a" * (MAX_CONFIG_CHARS + 1)], chars),
    ]
    for value, message in refused:
        with pytest.raises(ConfigError) as info:
            check_config_size(value, "x")
        assert str(info.value) == message


# --- the method switch, in detail: when arguments are kept, and the note that says what was dropped ---------------


def test_naming_the_method_a_config_already_has_keeps_its_arguments():
    """Switching is against the config's own method, or the default method when it names none."""
    from crossdistill.config import DEFAULT_METHOD

    kd = {"method": "kd", "method_args": {"temperature": 2.0}}
    assert apply_overrides(kd, ["method=kd"])["method_args"] == {"temperature": 2.0}
    unnamed = {"method_args": {"weight": 0.2}}  # the default method's arguments
    assert apply_overrides(unnamed, [f"method={DEFAULT_METHOD}"])["method_args"] == {"weight": 0.2}
    assert "method_args" not in apply_overrides(unnamed, ["method=kd"])


def _switch_note(base_args, method="kd"):
    notes = []
    apply_overrides({"method": "rsd", "method_args": base_args}, [f"method={method}"], notes=notes)
    assert len(notes) == 1
    return notes[0]


def test_the_switch_note_lists_at_most_ten_dropped_keys_each_cut_to_fifty_characters():
    ten = {f"k{i}": i for i in range(10)}
    assert "the method_args of rsd (k0, k1, k2, k3, k4, k5, k6, k7, k8, k9) are dropped" in _switch_note(ten)
    eleven = {f"k{i}": i for i in range(11)}
    assert "the method_args of rsd (k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, ...) are dropped" in _switch_note(eleven)
    long_key = "x" * 60
    assert f"the method_args of rsd ({'x' * 50}) are dropped" in _switch_note({long_key: 1})


def test_the_switch_note_shows_values_that_are_not_names_shortened():
    # method_args that is not a mapping (a config error later) and a method that is not a name
    assert "the method_args of rsd ('abc') are dropped" in _switch_note("abc")
    assert "method changed from rsd to 123 on the command line" in _switch_note({"weight": 1}, method="123")
    long = "[" + ", ".join(str(i) for i in range(100)) + "]"  # a list as the method: shown cut, not whole
    note = _switch_note({"weight": 1}, method=long)
    assert "method changed from rsd to [0, 1, 2, 3, 4, 5, 6, 7, ...] on the command line" in note


def test_a_method_override_is_split_at_its_first_equals_sign_and_parsed_as_any_value():
    dropped = apply_overrides({"method": "kd", "method_args": {"temperature": 2.0}}, ["method=a=b"])
    assert dropped["method"] == "a=b" and "method_args" not in dropped
    from crossdistill.config import MAX_CONFIG_VALUES

    too_big = "[" + ",".join(["0"] * MAX_CONFIG_VALUES) + "]"
    with pytest.raises(ConfigError, match=r"^the value of override method expands to more than"):
        apply_overrides({"method": "kd"}, [f"method={too_big}"])


def test_overrides_refuse_a_config_that_expands_too_far():
    from crossdistill.config import MAX_CONFIG_VALUES

    huge = {"method_args": {f"k{i}": i for i in range(MAX_CONFIG_VALUES)}}
    with pytest.raises(ConfigError, match=r"^the run config expands to more than"):
        apply_overrides(huge, ["train.epochs=1"])


def test_a_config_from_overrides_alone_needs_no_file():
    cfg = load_config(None, ["student.name=resnet18", "method=kd", "train.epochs=3"])
    assert cfg.student.name == "resnet18" and cfg.method == "kd" and cfg.train.epochs == 3


def test_a_method_switch_in_any_base_is_noted_where_it_happens(tmp_path):
    (tmp_path / "kd.yaml").write_text("student: {name: resnet18}\nmethod: kd\nmethod_args: {temperature: 2.0}\n")
    (tmp_path / "dist.yaml").write_text("method: dist\n")
    (tmp_path / "both.yaml").write_text("base: [kd.yaml, dist.yaml]\n")  # the second base switches the method
    (tmp_path / "top.yaml").write_text("base: both.yaml\ntrain: {epochs: 2}\n")  # a base of a base switches it
    notes = []
    cfg = load_config(tmp_path / "top.yaml", notes=notes)
    assert cfg.method == "dist" and cfg.method_args == {}
    assert notes == [
        f"method changed from kd to dist in {tmp_path / 'dist.yaml'}: the method_args of kd (temperature) are "
        "dropped and dist starts from its defaults (set method_args.KEY=VALUE to change one)"
    ]


def test_a_yaml_error_without_a_problem_text_is_still_one_line():
    from crossdistill.config import _yaml_problem

    assert _yaml_problem(yaml.MarkedYAMLError(note="expected a\n   mapping  here")) == "expected a mapping here"
