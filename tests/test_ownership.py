"""A run directory is trained by one process at a time: a second writer (a new run or a
``--resume``) is refused naming the holder and writes nothing; the lock dies with its holder, so
a SIGKILLed run resumes; the owner removes temporary files left by an interrupted write; a
resumed epoch logs the train loss of the whole epoch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mixlab.config import ConfigError, build_config
from mixlab.engine.trainer import train
from mixlab.fileio import DirectoryBusy, DirectoryLock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses flock, SIGSTOP and SIGKILL")

# the model of the 0.1.0 fixture run: 4 steps an epoch on 128 digits at 16 px, a few seconds a run
SMALL = {
    "model": {"name": "spec:patch4 / convnext:1x8 / attention:1x16:heads=2"},
    "data": {"name": "digits", "limit_train": 128, "limit_val": 64, "img_size": 16},
    "train": {"epochs": 2, "batch_size": 32, "seed": 0},
    "checkpoint": {"every_steps": 3, "keep_last": 10},
    "log": {"progress": "false", "print_every": 0},
}


def _config(tmp_path, **train) -> Path:
    layer = json.loads(json.dumps(SMALL))
    layer["train"].update(train)
    layer["output_dir"] = str(tmp_path)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(layer))
    return p


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mixlab", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _mixlab(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixlab", "train", *args], capture_output=True, text=True,
                          timeout=300)


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _holds_lock(run: Path, pid: int):
    def ready() -> bool:
        try:
            return (run / ".lock").read_text().split()[:1] == [str(pid)]
        except OSError:
            return False
    return ready


def _snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_second_writer_is_refused_while_a_run_trains(tmp_path):
    cfg = _config(tmp_path)
    run = tmp_path / "cB"
    first = _start(str(cfg), "--name", "cB", "--seed", "3")
    # a new run, while the first sets up (it holds the lock, has not written config.yaml yet), and a
    # --resume once it trains (config.yaml written): each stopped with SIGSTOP, which keeps the lock
    for ready, second in ((_holds_lock(run, first.pid), [str(cfg), "--name", "cB", "--seed", "4"]),
                          (lambda: (run / "config.yaml").exists(), ["--resume", str(run)])):
        _wait_for(first, ready, "it held the lock")
        first.send_signal(signal.SIGSTOP)
        try:
            before = _snapshot(run)
            r = _mixlab(*second)
            assert r.returncode == 2, (r.stdout, r.stderr)
            assert f"is being trained by process {first.pid}" in r.stderr and "mixlab train" in r.stderr, r.stderr
            assert _snapshot(run) == before  # the refused one wrote nothing
        finally:
            first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 3
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
    assert (run / ".lock").read_text() == ""  # a lock nobody holds names nobody


def test_two_new_runs_started_together_give_one_run_and_one_refusal(tmp_path):
    cfg = _config(tmp_path, epochs=3)
    procs = {seed: _start(str(cfg), "--name", "cB", "--seed", str(seed)) for seed in (3, 4)}
    results = {seed: (p.pid, *p.communicate(timeout=300), p.returncode) for seed, p in procs.items()}
    codes = sorted(r[3] for r in results.values())
    assert codes == [0, 2], results
    winner = next(s for s, r in results.items() if r[3] == 0)
    loser = next(s for s, r in results.items() if r[3] == 2)
    err = results[loser][2]
    assert f"is being trained by process {results[winner][0]}" in err or "already holds a run" in err, err
    run = tmp_path / "cB"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == winner
    assert json.loads((run / "summary.json").read_text())["steps"] == 12


def test_a_killed_run_leaves_no_lock_and_its_temporary_files_are_removed(tmp_path):
    cfg = _config(tmp_path, epochs=3)
    run = tmp_path / "k"
    proc = _start(str(cfg), "--name", "k")
    _wait_for(proc, lambda: (run / "checkpoints" / "latest.json").exists(), "its first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (run / "summary.json").exists()
    # what a kill in the middle of atomic_write leaves: a hard link of the best weights, a half summary
    planted = [run / "checkpoints" / ".best.safetensors.a1b2c3d_.tmp", run / ".summary.json.zz99yy88.tmp"]
    os.link(next((run / "checkpoints").glob("ckpt-*.safetensors")), planted[0])
    planted[1].write_text('{"half')
    mine = run / ".notes.tmp"  # not a name atomic_write gives: not touched
    mine.write_text("keep")
    r = _mixlab("--resume", str(run))
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    assert "removed 2 temporary file(s) left by an interrupted write" in r.stdout, r.stdout
    assert not any(p.exists() for p in planted) and mine.read_text() == "keep"
    assert json.loads((run / "summary.json").read_text())["steps"] == 12


def test_a_refused_new_run_in_a_finished_directory_removes_nothing(tmp_path):
    cfg = build_config(json.loads(json.dumps({**SMALL, "name": "done", "output_dir": str(tmp_path),
                                              "train": {**SMALL["train"], "epochs": 1}})))
    train(cfg)
    run = tmp_path / "done"
    leftover = run / ".summary.json.abcd1234.tmp"
    leftover.write_text("x")
    before = _snapshot(run)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)
    assert _snapshot(run) == before


def test_a_failed_start_leaves_no_directory(tmp_path):
    # the lock creates the run directory (and its output directory) first: a run that fails while it
    # sets up removes them again, as before there was a lock
    layer = {**SMALL, "name": "bad", "output_dir": str(tmp_path / "out" / "deeper"),
             "data": {"name": "imagefolder", "root": str(tmp_path / "missing"), "img_size": 16}}
    with pytest.raises(ValueError, match="missing"):
        train(build_config(json.loads(json.dumps(layer))))
    assert not (tmp_path / "out").exists()


def test_directory_lock_is_exclusive_and_released(tmp_path):
    d = tmp_path / "d"
    with DirectoryLock(d) as lock:
        assert (d / ".lock").read_text().split()[0] == str(os.getpid())
        # flock is per open file: a second open in this process is refused as another process's would be
        with pytest.raises(DirectoryBusy) as e:
            DirectoryLock(d)
        assert e.value.pid == os.getpid()
        assert lock.path == d / ".lock"
    with DirectoryLock(d):  # released: taken again
        pass
    DirectoryLock(d).release(remove=True)
    assert not (d / ".lock").exists()


def test_arena_keeps_its_message(tmp_path):
    from mixlab.arena import ArenaSettings, run_arena
    out = tmp_path / "a"
    with DirectoryLock(out):
        with pytest.raises(ConfigError, match="another arena is running in"):
            run_arena(ArenaSettings(models=["spec:patch4 / convnext:1x16:kernel=3"], epochs=1, out=str(out)),
                      quiet=True)
    assert not (out / "runs").exists()


def test_a_resumed_epoch_logs_the_loss_of_the_whole_epoch(tmp_path):
    # train uninterrupted, keeping every checkpoint; then drop the last one and resume from the
    # mid-epoch checkpoint of epoch 2 (step 6 of 8): epoch 2's row must be the uninterrupted one
    ref = tmp_path / "ref"
    train(build_config(json.loads(json.dumps({**SMALL, "name": "ref", "output_dir": str(tmp_path)}))))
    run = tmp_path / "cut"
    shutil.copytree(ref, run)
    for p in (run / "checkpoints").glob("ckpt-00000008.*"):
        p.unlink()
    (run / "summary.json").unlink()
    cfg = build_config(json.loads(json.dumps({**SMALL, "name": "cut", "output_dir": str(tmp_path)})))
    train(cfg, resume=True)

    def rows(r):
        return [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]

    assert [x["train_loss"] for x in rows(run)] == [x["train_loss"] for x in rows(ref)]
