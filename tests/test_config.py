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


# dev_perturb.py's setup (scFormer examples/perturbation/dev_perturb.py at 2df344a), with the
# line, variable or default each value comes from ("model": scformer/model/generation_model.py,
# "GEARS": gears/pertdata.py 0.1.2, "Adam": torch.optim.Adam's defaults).
SEED_SETTINGS = {
    "model.embsize": (64, "embsize = 64"),
    "model.d_hid": (64, "d_hid = 64"),
    "model.nlayers": (4, "nlayers = 4"),
    "model.nhead": (4, "nhead = 4"),
    "model.dropout": (0.2, "dropout = 0.2"),
    "model.attention_dropout": (None, "model: TransformerEncoderLayer(dropout) on attention too"),
    "model.nlayers_cls": (3, "TransformerGenerator(..., nlayers_cls=3)"),
    "model.pad_value": (0.0, "pad_value = 0"),
    "model.pert_pad_id": (2, "pert_pad_id = 2"),
    "model.max_value": (512.0, "model: ValueEncoding(max_value=512)"),
    "model.cell_emb_style": ("cls", 'cell_emb_style = "cls"'),
    "model.prepend_cls_token": (False, "no <cls> token in the perturbation input"),
    "model.mvc_decoder_style": (
        "inner product, detach",
        'mvc_decoder_style = "inner product, detach"',
    ),
    "model.dtype": ("float32", "no autocast"),
    "model.output_baseline": ("none", "model: decoder = nn.Linear(d_model, 1)"),
    "model.gene_embedding_init": ("random", "model: init_weights, uniform(-0.1, 0.1)"),
    "model.additive_prior": (False, "no prior"),
    "model.seen_single_correction": (False, "no correction"),
    "model.shrink_singles": (False, "no shrinkage of measured singles"),
    "model.shrink_prior": ("normal", "the key's default; no shrinkage of measured singles"),
    "model.coexpression_prior": (False, "no prior"),
    "model.unseen_single": ("network", "the model predicts every perturbation"),
    "model.unseen_in_combo": ("network", "the model predicts every perturbation"),
    "model.control_anchor": (False, "the network's output on the paired control cells"),
    "model.init": ("torch", "PyTorch's initialisers"),
    "model.expr_decoder": ("linear", "model: decoder = nn.Linear(d_model, 1)"),
    "model.decoder_activation": (None, "model: no affine decoder"),
    "model.decoder_adaptive_bias": (False, "model: no affine decoder"),
    "model.input_batchnorm": (False, "model: no BatchNorm"),
    "model.explicit_zero_prob": (False, "model: no zero-probability head"),
    "model.sample_zero_prob": (False, "model: no zero-probability head"),
    "model.pre_norm": (False, "model: nn.TransformerEncoderLayer (post-LN)"),
    "objective.mlm": (True, "MLM = True"),
    "objective.cls": (False, "CLS = False"),
    "objective.cce": (False, "CCE = False"),
    "objective.mvc": (False, "MVC = False"),
    "objective.ecs": (False, "ECS = False"),
    "objective.mse_weight": (1.0, "loss = loss_mse"),
    "objective.cls_weight": (1.0, "loss = loss + loss_cls"),
    "objective.cce_weight": (10.0, 'loss_cce = 10 * output_dict["loss_cce"]'),
    "objective.mvc_weight": (1.0, "loss = loss + loss_mvc"),
    "objective.ecs_weight": (10.0, 'loss_ecs = 10 * output_dict["loss_ecs"]'),
    "objective.cce_temperature": (0.5, "model: Similarity(temp=0.5)"),
    "objective.ecs_threshold": (0.85, "ecs_threshold = 0.85"),
    "data.split": ("simulation", 'split = "simulation"'),
    "data.split_seed": (1, "pert_data.prepare_split(split=split, seed=1)"),
    "data.train_gene_set_size": (0.75, "GEARS: prepare_split default"),
    "data.combo_seen2_train_frac": (0.75, "GEARS: prepare_split default"),
    "data.split_path": (None, "GEARS's own split"),
    "data.include_zero_gene": ("batch-wise", 'include_zero_gene = "batch-wise"'),
    "data.max_seq_len": (1536, "max_seq_len = 1536"),
    "data.redraw_pairing": (False, "GEARS: create_cell_graph_dataset pairs once"),
    "data.drop_last": (True, "GEARS: get_dataloader, train DataLoader(drop_last=True)"),
    "data.train_target": ("cell", "GEARS: y = the perturbed cell"),
    "data.seed": (None, "set_seed(42) seeds everything"),
    "optim.lr": (1e-4, "lr = 1e-4"),
    "optim.schedule_interval": (1, "schedule_interval = 1"),
    "optim.decay": (0.9, "StepLR(optimizer, schedule_interval, gamma=0.9)"),
    "optim.grad_clip_norm": (1.0, "clip_grad_norm_(model.parameters(), 1.0)"),
    "optim.b1": (0.9, "Adam: betas[0]"),
    "optim.b2": (0.999, "Adam: betas[1]"),
    "optim.eps": (1e-8, "Adam: eps"),
    "optim.weight_decay": (0.0, "Adam: weight_decay"),
    "optim.ema_decay": (0.0, "evaluates the trained parameters, no average"),
    "train.batch_size": (32, "batch_size = 32"),
    "train.eval_batch_size": (32, "eval_batch_size = 32"),
    "train.epochs": (6, "epochs = 6"),
    "train.early_stop": (0, "for epoch in range(1, epochs + 1), no break"),
    "train.best_metric": ("val_mse", "if val_loss < best_val_loss"),
    "train.best_mode": ("min", "if val_loss < best_val_loss"),
    "train.log_interval": (100, "log_interval = 100"),
    "train.log_mre": (True, "its log line shows mre"),
    "train.seed": (42, "set_seed(42)"),
    "train.max_steps": (0, "no step limit"),
    "train.max_val_batches": (0, "evaluate() runs the whole val loader"),
    "train.load_model": (None, "trains from scratch"),
    "train.load_param_prefixes": ((), "trains from scratch"),
}
# Keys with no counterpart in dev_perturb.py: how the computation is carried out (not what it
# computes), the data source (configs/scformer.yaml's header: simulated, to run offline) and
# bookkeeping.
NOT_FROM_THE_SEED = {
    "model.attention",
    "model.attention_block_size",
    "model.attention_eval_block_size",
    "model.remat",
    "model.ntoken",
    "model.pad_token_id",
    "model.cls_token_id",
    "model.n_cls",
    "data.path",
    "data.label_key",
    "data.backed",
    "data.backed_above_gb",
    "data.cache_mb",
    "train.keep_checkpoints",
}


def test_scformer_yaml_matches_seed_settings():
    config = dataclasses.asdict(load_config("configs/scformer.yaml"))
    keys = {f"{section}.{key}" for section, values in config.items() for key in values}
    assert keys == set(SEED_SETTINGS) | NOT_FROM_THE_SEED, "a key is neither listed nor excused"
    for name, (want, source) in SEED_SETTINGS.items():
        section, key = name.split(".")
        assert config[section][key] == want, f"{name} is not dev_perturb.py's ({source})"


def test_default_yaml_differs_from_the_seed_setup_only_where_listed():
    seed, rec = load_config("configs/scformer.yaml"), load_config("configs/default.yaml")
    changed = {
        f"{section}.{key}"
        for section in ("model", "objective", "data", "optim", "train")
        for key, value in dataclasses.asdict(getattr(rec, section)).items()
        if value != dataclasses.asdict(getattr(seed, section))[key]
    }
    assert changed == {
        # The recommended training (README "What the recommended setup changes").
        "model.output_baseline",
        "model.gene_embedding_init",
        "model.seen_single_correction",
        "model.shrink_singles",
        "model.shrink_prior",
        "model.coexpression_prior",
        "model.unseen_single",
        "model.unseen_in_combo",
        "data.train_target",
        "optim.lr",
        "train.epochs",
        # This project's defaults where the seed's choice is a detail of its script.
        "model.prepend_cls_token",
        "model.init",
        "data.include_zero_gene",
        "data.redraw_pairing",
        "data.drop_last",
        "train.best_metric",
        "train.best_mode",
        "train.log_mre",
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


def test_fidelity_keys_reject_bad_values():
    with pytest.raises(ConfigError, match=r"model\.init: 'pytorch' is not one of"):
        config_from_dict({"model": {"init": "pytorch"}})
    with pytest.raises(ConfigError, match=r"data\.drop_last: expected true or false"):
        config_from_dict({"data": {"drop_last": "yes"}})
    with pytest.raises(ConfigError, match=r"data\.redraw_pairing: expected true or false"):
        config_from_dict({"data": {"redraw_pairing": 1}})
    with pytest.raises(ConfigError, match=r"train\.log_mre: expected true or false"):
        config_from_dict({"train": {"log_mre": "no"}})
    with pytest.raises(ConfigError, match="would keep the worst checkpoint"):
        config_from_dict({"train": {"best_metric": "val_mse", "best_mode": "max"}})


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
