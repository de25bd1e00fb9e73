"""Configuration: layers, validation with helpful errors, recipes."""
from __future__ import annotations

import pytest
import yaml

from mixlab.cli import main
from mixlab.config import Config, ConfigError, build_config, config_from_dict, list_recipes


def test_layers_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("recipe: deit\ntrain: {epochs: 7}\noptimizer: {weight_decay: 0.1}\n")
    from mixlab.config import load_yaml
    cfg = build_config(load_yaml(f), {"train": {"batch_size": 16}}, overrides=["optimizer.weight_decay=0.2",
                                                                             "aug.rand_augment={num_ops: 1}"])
    assert cfg.recipe == "deit"
    assert cfg.train.epochs == 7 and cfg.train.batch_size == 16
    assert cfg.optimizer.weight_decay == 0.2  # --set wins over the file
    assert cfg.aug.mixup == 0.8  # from the recipe
    assert cfg.aug.rand_augment == {"num_ops": 1}


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1", "did you mean 'optimizer.lr'"),
    ("traing.epochs=1", "did you mean 'train'"),
    ("train.epochs=abc", "train.epochs: expected an integer"),
    ("train.epochs=0", "train.epochs must be at least 1"),
    ("optimizer.name=adamx", "not one of adamw, adam, sgd, lamb"),
    ("aug.hflip=1.5", "aug.hflip must be a probability"),
    ("train.epochs", "must look like section.key=value"),
    ("model.kwargs=3", "model.kwargs: expected a mapping"),
])
def test_bad_keys_and_values_are_explained(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(overrides=[override])


def test_ints_are_accepted_for_floats_and_bools_are_not_ints():
    assert build_config(overrides=["optimizer.weight_decay=0"]).optimizer.weight_decay == 0.0
    with pytest.raises(ConfigError):
        build_config(overrides=["train.epochs=true"])


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_loads_and_round_trips(name):
    cfg = build_config(recipe=name)
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


def test_recipes_say_what_the_issue_asks():
    assert set(list_recipes()) >= {"basic", "deit", "convnext", "deit3"}
    deit = build_config(recipe="deit")
    assert (deit.optimizer.name, deit.optimizer.base_lr, deit.optimizer.lr_base_batch) == ("adamw", 5e-4, 512)
    assert (deit.schedule.warmup_epochs, deit.train.label_smoothing, deit.aug.mixup, deit.aug.cutmix) == (5, 0.1, 0.8, 1.0)
    assert deit.aug.rand_augment == {"num_ops": 2, "magnitude": 9} and deit.aug.random_erasing == 0.25
    assert deit.model.drop_path_rate == 0.1
    cnx = build_config(recipe="convnext")
    assert (cnx.optimizer.base_lr, cnx.schedule.warmup_epochs, cnx.model.layer_scale, cnx.ema.enabled) == \
        (4e-3, 20, 1e-6, True)
    d3 = build_config(recipe="deit3")
    assert (d3.optimizer.name, d3.train.loss, d3.aug.three_augment, d3.aug.simple_random_crop) == \
        ("lamb", "bce", True, True)


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown recipe 'dei'"):
        build_config(recipe="dei")


def test_cli_print_config_and_recipes(capsys):
    assert main(["train", "--model", "convnext_tiny", "--epochs", "3", "--set", "optimizer.lr=0.01",
                 "--print-config"]) == 0
    cfg = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    assert (cfg.model.name, cfg.train.epochs, cfg.optimizer.lr, cfg.recipe) == ("convnext_tiny", 3, 0.01, "basic")
    assert main(["recipes"]) == 0
    assert "deit3" in capsys.readouterr().out
    assert main(["recipes", "deit"]) == 0
    assert "mixup: 0.8" in capsys.readouterr().out
    assert main(["train", "--set", "optimizer.lrr=1", "--print-config"]) == 2
    assert "did you mean 'optimizer.lr'" in capsys.readouterr().err


def test_default_config_is_valid():
    assert isinstance(config_from_dict({}), Config)


def test_progress_takes_yaml_booleans():
    """`--set log.progress=false` is YAML's false, not the string: both mean no progress bar."""
    from mixlab.config import build_config
    assert str(build_config(overrides=["log.progress=false"]).log.progress).lower() == "false"
    assert str(build_config(overrides=["log.progress=true"]).log.progress).lower() == "true"
    assert build_config(overrides=["log.progress=auto"]).log.progress == "auto"
