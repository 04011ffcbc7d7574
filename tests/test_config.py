"""Config files and overrides: typed, frozen, unknown keys are errors that list valid keys."""

import dataclasses

import pytest

from scformer_jax.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    save_config,
)

CONFIGS = ["default", "scformer", "norman", "adamson", "scgpt"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load(name):
    config = load_config(f"configs/{name}.yaml")
    assert isinstance(config, Config)
    if name == "scgpt":
        assert (config.model.embsize, config.model.nlayers, config.model.nhead) == (512, 12, 8)
        assert config.train.batch_size == 64 and config.train.early_stop == 10


def test_scformer_yaml_matches_seed_settings():
    c = load_config("configs/scformer.yaml")
    assert (c.model.embsize, c.model.d_hid, c.model.nlayers, c.model.nhead) == (64, 64, 4, 4)
    assert c.model.dropout == 0.2 and c.optim.lr == 1e-4 and c.train.batch_size == 32
    assert c.objective.cce_weight == 10 and c.objective.ecs_weight == 10
    assert c.objective.ecs_threshold == 0.85 and c.data.max_seq_len == 1536
    assert c.train.epochs == 6 and c.data.train_target == "cell"
    assert c.model.output_baseline == "none" and not c.model.additive_prior
    assert not c.model.seen_single_correction and not c.model.coexpression_prior
    assert c.model.gene_embedding_init == "random"


def test_default_yaml_is_the_seed_model_with_the_recommended_training():
    seed, rec = load_config("configs/scformer.yaml"), load_config("configs/default.yaml")
    changed = {
        f"{section}.{key}"
        for section in ("model", "objective", "data", "optim", "train")
        for key, value in dataclasses.asdict(getattr(rec, section)).items()
        if value != dataclasses.asdict(getattr(seed, section))[key]
    }
    assert changed == {
        "model.output_baseline",
        "model.gene_embedding_init",
        "model.seen_single_correction",
        "model.coexpression_prior",
        "data.train_target",
        "optim.lr",
        "train.epochs",
        "train.early_stop",
    }


@pytest.mark.parametrize("name", ["default", "scformer"])
def test_every_key_of_the_main_configs_is_commented(name):
    lines = [line for line in open(f"configs/{name}.yaml") if line.startswith("  ")]
    assert lines and all("#" in line for line in lines)


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"optim": {"learning_rate": 1e-3}})
    assert "learning_rate" in str(err.value) and "lr" in str(err.value)
    with pytest.raises(ConfigError, match="Did you mean 'embsize'"):
        config_from_dict({"model": {"embsze": 32}})
    with pytest.raises(ConfigError, match="top level"):
        config_from_dict({"modle": {}})


def test_type_errors_are_named():
    with pytest.raises(ConfigError, match="model.nlayers: expected an integer"):
        config_from_dict({"model": {"nlayers": "four"}})
    with pytest.raises(ConfigError, match="objective.cce: expected true or false"):
        config_from_dict({"objective": {"cce": "yes"}})
    with pytest.raises(ConfigError, match="train.best_mode"):
        config_from_dict({"train": {"best_mode": "biggest"}})


def test_overrides_and_round_trip(tmp_path):
    config = load_config(
        "configs/default.yaml",
        ["optim.lr=3e-4", "objective.cce=true", "train.load_param_prefixes=[encoder]"],
    )
    assert config.optim.lr == 3e-4 and config.objective.cce
    assert config.train.load_param_prefixes == ("encoder",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 1.0  # type: ignore[misc]
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("configs/default.yaml", ["lr=3"])


def test_named_weights_follow_switches():
    config = load_config("configs/default.yaml", ["objective.cce=true", "objective.ecs=true"])
    assert config.objective.weights() == {"mse": 1.0, "cce": 10.0, "ecs": 10.0}
    with pytest.raises(ConfigError, match="always on"):
        config_from_dict({"objective": {"mlm": False}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
