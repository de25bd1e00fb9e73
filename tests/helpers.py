"""Helpers shared by the tests that run mixlab's command line in subprocesses (``from helpers import ...``)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def mixlab(*args, env=None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """``python -m mixlab ARGS`` to its end, output captured as text."""
    return subprocess.run([sys.executable, "-m", "mixlab", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)


def latest_step(run: Path) -> int | None:
    """The step of a run's newest complete checkpoint (None before the first)."""
    try:
        return json.loads((Path(run) / "checkpoints" / "latest.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def kill_at_checkpoint(args, run: Path, when, timeout: float = 300) -> None:
    """Start ``mixlab train ARGS`` (training into ``run``) and SIGKILL it as soon as its newest checkpoint's step
    satisfies ``when(step)``; fails the test if the run ends first."""
    proc = subprocess.Popen([sys.executable, "-m", "mixlab", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        step = latest_step(run)
        if step is not None and when(step):
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Path(run) / "summary.json").exists(), "the run finished before the kill; make it longer"


def train_in_this_process(run_dir, *_):
    """A stand-in for the arena's ``train_in_child`` (monkeypatch it in ``mixlab.arena.runner``): the same
    training run, in the test's process, without a child's start-up (some seconds of imports each); and a task
    registered by a test is known there."""
    from mixlab.config import load_run_config
    from mixlab.engine.trainer import train
    train(load_run_config(run_dir), run_dir=run_dir, resume=True)
    return 0
