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
    ],
)
def test_bad_values_name_the_key(tmp_path, override, match):
    with pytest.raises(ConfigError if "method=" not in override else Exception, match=match):
        check_run_config(build_config(apply_overrides(tiny_run(tmp_path), [override])))


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
