"""Config: defaults, sources and their precedence, and errors that name the key at fault.

Every call passes ``env=`` explicitly so the tests never see the real environment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from traci_ml.core.config import Config, load_config, parse_set, validate
from traci_ml.core.errors import ConfigError, TraciError


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(**kwargs: object) -> str:
    """The message of the ConfigError that ``load_config(**kwargs)`` raises."""
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)  # type: ignore[arg-type]
    return str(info.value)


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


def test_defaults_validate() -> None:
    config = load_config(env={})
    assert config == Config() == validate({})
    assert (config.run_id, config.embed_dim, config.data.source) == ("traci", 64, "digits")
    assert config.network.liveness > config.network.heartbeat_interval
    assert config.embed_dim % config.reducer.heads == 0
    assert config.run_path == Path("runs/traci")


def test_yaml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "run_id: exp-1\n"
        "embed_dim: 32\n"
        "data: {views: halves, test_fraction: 0.25}\n"
        "expert: {model: {hidden: [64, 32], activation: gelu}}\n"
        "train:\n  steps: 10\n  eval_every: 0\n",
    )
    config = load_config(path, env={})
    assert config.run_id == "exp-1"
    assert config.embed_dim == 32
    assert (config.data.views, config.data.test_fraction) == ("halves", 0.25)
    assert config.expert.model.hidden == [64, 32]
    assert config.expert.model.activation == "gelu"
    assert (config.train.steps, config.train.eval_every) == (10, 0)
    assert config.train.batch_size == 64  # untouched keys keep their defaults
    assert config.run_path == Path("runs/exp-1")


def test_empty_yaml_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == Config()


def test_env_overrides_parse_as_yaml_scalars() -> None:
    config = load_config(
        env={
            "TRACI_NETWORK__BROKER_HOST": "broker",
            "TRACI_TRAIN__STEPS": "5",
            "TRACI_EXPERT__MODEL__HIDDEN": "[16, 8]",
            "TRACI_SEED": "7",
            "HOME": "/root",  # not ours: ignored
            "TRACI_": "x",  # the bare prefix: ignored
            "TRACI_IMAGE": "traci:cpu",  # another tool's (compose's) variable: ignored
        }
    )
    assert config.network.broker_host == "broker"
    assert config.train.steps == 5
    assert config.expert.model.hidden == [16, 8]
    assert config.seed == 7


def test_set_overrides() -> None:
    overrides = parse_set(["train.steps=9", " network.broker_host =10.0.0.7", "expert.tau=0.5"])
    assert overrides == {
        "train.steps": "9",
        "network.broker_host": "10.0.0.7",
        "expert.tau": "0.5",
    }
    config = load_config(overrides=overrides, env={})
    assert (config.train.steps, config.network.broker_host, config.expert.tau) == (
        9,
        "10.0.0.7",
        0.5,
    )


def test_parse_set_splits_at_the_first_equals_sign() -> None:
    assert parse_set(["run_dir=out/a=b"]) == {"run_dir": "out/a=b"}
    assert parse_set([]) == {}


@pytest.mark.parametrize(
    "use_env,use_set,expected",
    [(False, False, 10), (True, False, 20), (False, True, 30), (True, True, 30)],
)
def test_precedence_file_then_env_then_set(
    tmp_path: Path, use_env: bool, use_set: bool, expected: int
) -> None:
    path = write(tmp_path, "train: {steps: 10, batch_size: 8}\n")
    env = {"TRACI_TRAIN__STEPS": "20"} if use_env else {}
    overrides = {"train.steps": "30"} if use_set else None
    config = load_config(path, env=env, overrides=overrides)
    assert config.train.steps == expected
    assert config.train.batch_size == 8  # the file's sibling key survives an override


# --------------------------------------------------------------------------------------
# Errors: each names the key (or variable, or file) at fault
# --------------------------------------------------------------------------------------


def test_config_error_is_a_traci_error() -> None:
    assert issubclass(ConfigError, TraciError)


@pytest.mark.parametrize(
    "text,key",
    [
        ("train: {stepz: 3}\n", "train.stepz"),
        ("expert: {model: {widths: [3]}}\n", "expert.model.widths"),
        ("bogus: 1\n", "bogus"),
    ],
)
def test_unknown_key_in_file(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(path=write(tmp_path, text))
    assert f"{key}: unknown key" in message


def test_unknown_env_var_names_the_variable() -> None:
    message = config_error(env={"TRACI_TRAIN__STEPZ": "3"})
    assert "TRACI_TRAIN__STEPZ" in message
    assert "train.stepz" in message


@pytest.mark.parametrize("key,named", [("train.stepz", "train.stepz"), ("nosuch.x", "nosuch")])
def test_unknown_set_key(key: str, named: str) -> None:
    message = config_error(overrides={key: "1"})
    assert f"--set {key}" in message
    assert f"unknown config key {named!r}" in message


def test_set_below_a_scalar_key() -> None:
    message = config_error(overrides={"train.steps.x": "1"})
    assert "'train.steps' has no sub-keys" in message


def test_set_below_a_non_mapping_from_the_file(tmp_path: Path) -> None:
    message = config_error(path=write(tmp_path, "train: 3\n"), overrides={"train.steps": "1"})
    assert "'train' is not a mapping" in message


@pytest.mark.parametrize(
    "key,value",
    [
        ("train.steps", "many"),
        ("embed_dim", "[1, 2]"),
        ("expert.model.hidden", "7"),
        ("expert.model.activation", "swish"),
        ("expert.model.module", "not a path"),
        ("data.source", "parquet"),
        ("run_id", "has space"),
    ],
)
def test_bad_type_or_choice_names_the_key(key: str, value: str) -> None:
    assert f"{key}:" in config_error(overrides={key: value})


@pytest.mark.parametrize(
    "key,value",
    [
        ("train.steps", "0"),
        ("train.batch_size", "-1"),
        ("expert.tau", "0"),
        ("expert.tau", "1.5"),
        ("expert.window", "2000"),
        ("network.expert_port", "70000"),
        ("data.test_fraction", "1.0"),
        ("reducer.expert_dropout", "1"),
        ("expert.model.hidden", "[64, 0]"),
    ],
)
def test_out_of_range_names_the_key(key: str, value: str) -> None:
    assert f"{key}:" in config_error(overrides={key: value})


def test_heads_must_divide_embed_dim() -> None:
    message = config_error(overrides={"reducer.heads": "5"})
    assert "reducer.heads (5) must divide embed_dim (64)" in message
    load_config(overrides={"reducer.heads": "8"}, env={})  # 8 divides 64: fine


@pytest.mark.parametrize(
    "overrides,named",
    [
        ({"data.source": "csv"}, "data.path"),
        ({"data.source": "csv", "data.path": "x.csv"}, "data.label"),
        ({"data.source": "csv", "data.path": "x.csv", "data.label": "y"}, "data.views"),
    ],
)
def test_csv_source_needs_path_label_and_views(overrides: dict[str, str], named: str) -> None:
    assert named in config_error(overrides=overrides)


@pytest.mark.parametrize("liveness", ["0.5", "0.2"])  # heartbeat_interval is 0.5
def test_liveness_must_exceed_heartbeat_interval(liveness: str) -> None:
    message = config_error(overrides={"network.liveness": liveness})
    assert "network.liveness must exceed network.heartbeat_interval" in message


def test_ports_must_differ() -> None:
    message = config_error(overrides={"network.reducer_port": "5555"})
    assert "network.expert_port and network.reducer_port must differ" in message


@pytest.mark.parametrize("item", ["train.steps", "=5", " =5"])
def test_malformed_set_item_names_itself(item: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_set(["seed=1", item])
    assert repr(item) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    message = config_error(path=path)
    assert str(path) in message
    assert "cannot read" in message


def test_directory_as_file(tmp_path: Path) -> None:
    assert str(tmp_path) in config_error(path=tmp_path)


def test_binary_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xff\xfe\x00train: 1\n")
    assert str(path) in config_error(path=path)


@pytest.mark.parametrize("text", ["train: [1, 2\n", "a: b: c\n", "\tx: 1\n"])
def test_invalid_yaml_names_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path=path)
    assert str(path) in message
    assert "not valid YAML" in message


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path=path)
    assert str(path) in message
    assert "mapping at the top level" in message


def test_a_view_may_carry_its_own_expert_model() -> None:
    cfg = load_config("examples/heterogeneous.yaml", env={})
    assert cfg.expert_model(0).hidden == [64]
    assert cfg.expert_model(1).module == "examples.experts:GatedExpert"
    assert cfg.expert_model(2).norm == "layernorm"
    assert cfg.expert_model_key(1) == "data.views[1].model"
    plain = load_config(env={})  # digits presets: every expert shares expert.model
    assert plain.expert_model(3) is plain.expert.model
    assert plain.expert_model_key(3) == "expert.model"


def test_a_views_bad_model_names_its_key(tmp_path: Path) -> None:
    from traci_ml.core.models.expert import build_expert_net

    raw = tmp_path / "c.yaml"
    raw.write_text(
        "data: {source: csv, path: x.csv, label: y, views: [{name: a, columns: [c],"
        " model: {module: 'no_such_pkg.mod:Net'}}]}\n"
    )
    cfg = load_config(raw, env={})
    with pytest.raises(ConfigError, match=r"data\.views\[0\]\.model\.module"):
        build_expert_net(cfg.expert_model(0), in_dim=1, out_dim=4, key=cfg.expert_model_key(0))
    raw.write_text(
        "data: {source: csv, path: x.csv, label: y, views: [{name: a, columns: [c],"
        " model: {hidden: [0]}}]}\n"
    )
    with pytest.raises(ConfigError, match=r"data\.views.*model\.hidden"):
        load_config(raw, env={})
