"""Task-owned configuration sections (mixlab.config.register_section): a toy section registered by a test
merges, checks, saves, reads back, resumes and defaults as the fixed sections do, and the built-in
``distill:`` section is one of them, there from a plain ``import mixlab.config``."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mixlab.config import (RUN_CONFIG, SECTIONS, Config, ConfigError, build_config, load_run_config, load_yaml,
                           register_section, resume_config, unregister_section)
from mixlab.config.section import TaskSection

SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass
class ToyConfig:
    strength: float = 1.0
    mode: str = "plain"
    label: str | None = None
    steps: int = 3
    shuffle: str | bool = "auto"


def check_toy(cfg) -> None:
    if cfg.toy.strength < 0:
        raise ConfigError(f"toy.strength must be at least 0, got {cfg.toy.strength}")


@pytest.fixture
def toy():
    section = register_section("toy", ToyConfig, task="toy", purpose="to train the toy", validate=check_toy,
                               choices={"mode": ("plain", "fancy"), "shuffle": ("auto", "true", "false")},
                               resume_refused="the checkpoints hold a toy trained with it", resume_safe=("steps",))
    yield section
    unregister_section("toy")


def test_a_section_merges_from_yaml_and_set(toy, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task: toy\ntoy: {strength: 2, mode: fancy}\n")
    cfg = build_config(load_yaml(f), overrides=["toy.steps=5", "toy.shuffle=true"])
    assert cfg.toy == ToyConfig(strength=2.0, mode="fancy", steps=5, shuffle=True)
    assert isinstance(cfg.toy.strength, float)  # an int for a float, as for the fixed sections
    assert build_config({"task": "toy"}).toy == ToyConfig()


@pytest.mark.parametrize("layer, override, message", [
    (None, "toy.strenght=2", "unknown configuration key 'toy.strenght'; did you mean 'toy.strength'?"),
    (None, "toi.steps=2", "unknown configuration key 'toi'; did you mean 'toy'?"),
    (None, "toy.steps=abc", "toy.steps: expected an integer, got 'abc'"),
    (None, "toy.steps=true", "toy.steps: expected an integer, got True"),
    (None, "toy.mode=odd", "toy.mode: 'odd' is not one of plain, fancy"),
    (None, "toy.shuffle=Sometimes", "toy.shuffle: 'sometimes' is not one of auto, true, false"),
    (None, "toy.strength=-1", "toy.strength must be at least 0, got -1.0"),  # the section's own check
    ({"toy": {"steps": [1]}}, None, "toy.steps: expected an integer, got [1]"),
    ({"toy": 3}, None, "expected a mapping of keys, got 3"),
    ({"toy": {"stepz": 1}}, None, "did you mean 'toy.steps'?"),
])
def test_a_section_checks_types_choices_and_its_own_rules(toy, layer, override, message):
    with pytest.raises(ConfigError) as e:
        build_config({"task": "toy", **(layer or {})}, overrides=[override] if override else [])
    assert message in str(e.value)


def test_a_section_round_trips_through_config_yaml(toy, tmp_path):
    cfg = build_config({"task": "toy", "toy": {"strength": 0.5, "label": "x"}})
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / RUN_CONFIG)
    saved = yaml.safe_load((run / RUN_CONFIG).read_text())
    assert list(saved)[list(saved).index("log") + 1:][:3] == ["distill", "mim", "toy"]  # after the fixed sections
    assert saved["toy"] == {"strength": 0.5, "mode": "plain", "label": "x", "steps": 3, "shuffle": "auto"}
    again = load_run_config(run)
    assert again == cfg and again.toy == ToyConfig(strength=0.5, label="x")
    again.toy.steps = 4
    assert again != cfg  # equality sees the registered sections


def test_a_config_yaml_written_before_the_section_reads_at_its_defaults(toy, tmp_path):
    d = build_config().to_dict()
    del d["toy"]
    run = tmp_path / "old"
    run.mkdir()
    (run / RUN_CONFIG).write_text(yaml.safe_dump(d))
    assert load_run_config(run).toy == ToyConfig()


def test_an_arena_json_written_before_the_section_goes_on(toy):
    from mixlab.arena.runner import _shared_config, _with_new_keys
    shared = _shared_config(build_config().to_dict())
    old = {k: v for k, v in shared.items() if k != "toy"}
    assert _with_new_keys({"seeds": 1, "train_config": old})["train_config"] == shared


def test_resuming_refuses_a_section_change_with_its_reason_and_takes_its_safe_keys(toy):
    saved = build_config({"task": "toy"})
    with pytest.raises(ConfigError) as e:
        resume_config(saved, build_config({"task": "toy", "toy": {"strength": 2}}))
    assert "cannot change toy.strength (1.0 -> 2.0: the checkpoints hold a toy trained with it)" in str(e.value)
    assert "toy.steps;" in str(e.value)  # listed among the keys that may change
    cfg, changes = resume_config(saved, build_config({"task": "toy", "toy": {"steps": 7}}))
    assert changes == [("toy.steps", 3, 7)] and cfg.toy.steps == 7


def test_a_section_of_another_task_must_stay_at_its_defaults(toy):
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["toy.steps=5"])
    assert str(e.value) == ("toy.steps is set but task is 'classification'; set task: toy to train the toy, or "
                            "leave toy.steps out")
    with pytest.raises(ConfigError, match="toy.mode is set but task is 'distill'"):
        build_config({"task": "distill", "distill": {"teacher": "t"}, "toy": {"mode": "fancy"}})
    assert build_config({"toy": {"strength": -1.0, "steps": 3}}, overrides=["toy.strength=1"]).toy == ToyConfig()


def test_distill_keys_without_task_distill_keep_their_message():
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["distill.teacher_weights=w.safetensors"])
    assert str(e.value) == ("distill.teacher_weights is set but task is 'classification'; set task: distill to "
                            "distil from a teacher, or leave distill.teacher_weights out")
    with pytest.raises(ConfigError, match="distill.alpha is set but task is 'classification'"):  # every key now
        build_config(overrides=["distill.alpha=0.3"])
    with pytest.raises(ConfigError, match="distill.type: 'x' is not one of hard, soft"):  # a choice first
        build_config(overrides=["distill.type=x", "distill.teacher=t"])


def test_registering_refuses_what_cannot_be_a_section(toy):
    assert register_section(toy) is toy  # the same section again: nothing changes
    with pytest.raises(ValueError, match="already registered"):
        register_section("toy", ToyConfig, resume_refused="another")
    with pytest.raises(ValueError, match="key of the configuration itself"):
        register_section("model", ToyConfig, resume_refused="x")
    with pytest.raises(ValueError, match="resume_safe names \\['step'\\]"):
        TaskSection("toy2", ToyConfig, resume_refused="x", resume_safe=("step",))
    with pytest.raises(ValueError, match="must be a dataclass"):
        TaskSection("toy2", dict, resume_refused="x")
    with pytest.raises(ValueError, match="why it cannot change on resume"):
        TaskSection("toy2", ToyConfig, resume_refused="")
    assert "toy2" not in SECTIONS


def test_an_unregistered_section_is_gone_and_a_late_one_reads_at_its_defaults():
    assert "toy" not in SECTIONS and "toy" not in build_config().to_dict()
    with pytest.raises(ConfigError, match="unknown configuration key 'toy'"):
        build_config(overrides=["toy.steps=1"])
    early = Config()
    register_section("toy", ToyConfig, resume_refused="x")
    try:
        assert early.toy == ToyConfig() and early.to_dict()["toy"]["steps"] == 3
    finally:
        unregister_section("toy")


def test_importing_mixlab_config_alone_registers_the_built_in_sections():
    """A fresh interpreter: ``distill:`` exists without the engine being imported (docs/architecture.md)."""
    code = ("import sys\nfrom mixlab.config import build_config\n"
            "cfg = build_config({'task': 'distill', 'distill': {'teacher': 't', 'alpha': 0.25}})\n"
            "assert cfg.distill.alpha == 0.25 and cfg.to_dict()['distill']['teacher'] == 't'\n"
            "assert not [m for m in sys.modules if m.startswith('mixlab.engine')], 'the engine was imported'\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
