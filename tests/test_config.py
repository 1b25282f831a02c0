import pytest
import yaml

from crossdistill.config import RunConfig, apply_overrides, build_config, load_config, save_config
from crossdistill.distillers.rsd import RSDConfig
from crossdistill.errors import ConfigError

from conftest import tiny_run


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
        ("data.scale=[0.5]", r"'data.scale': expected 2 values"),
        ("train.progress=maybe", r"'train.progress': expected bool"),
        ("method_args.kappa=-1", r"'method_args.kappa': must be >= 0"),
        ("method_args.gamma=0", r"'method_args.gamma': must be >= 1"),
        ("method_args.kapa=0.1", r"unknown config key 'method_args.kapa'.*kappa"),
        ("method=rsdd", r"unknown method 'rsdd'.*rsd"),
        ("train.amp=fp8", r"'train.amp'"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, match):
    with pytest.raises(ConfigError if "method=" not in override else Exception, match=match):
        build_config(apply_overrides(tiny_run(tmp_path), [override]))


def test_method_needing_a_teacher_without_one(tmp_path):
    raw = tiny_run(tmp_path)
    raw["teacher"] = None
    with pytest.raises(ConfigError, match="needs a teacher"):
        build_config(raw)


def test_overrides_parse_yaml_values_and_create_sections(tmp_path):
    raw = apply_overrides(tiny_run(tmp_path), ["train.epochs=5", "data.scale=[0.5, 1.0]", "train.ema_decay=0.999",
                                               "method_args.kappa=0.02", "teacher.checkpoint=/x/y.pt"])
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
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again == cfg


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
