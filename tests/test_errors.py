"""Every expected failure of the `mixlab` command ends in one line with what to do, an exit status
of `mixlab --help`'s list, and nothing written (issue 20, items 4-8 and 11)."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixlab import cli
from mixlab.arena import ArenaSettings, run_arena
from mixlab.cli import main
from mixlab.data import build_datasets

TINY = "spec:patch4 / convnext:1x16:kernel=3"
QUICK = ["--set", "data.limit_train=128", "--set", "data.limit_val=64", "--batch-size", "32"]


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mixlab {command}: error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, says", [
    (["info", "spec:patch0 / convnext:1x8"], "stem size 0"),
    (["info", "spec:conv0 / convnext:1x8"], "stem size 0"),
    (["info", "spec:conv6 / convnext:1x8"], "power of two"),
    (["info", "spec:patch4 / convnext:1x8:kernel=0"], "kernel must be a positive integer"),
    (["info", "spec:patch4 / convnext:1x8:kernel=-3"], "kernel must be a positive integer"),
    (["info", "spec:patch4 / attention:1x10:heads=3"], "heads=3 does not divide the width 10"),
    (["info", "spec:patch4 / window:1x8:window=0"], "window must be a positive integer"),
    (["info", "spec:patch4 / mlp:1x8:tokens_ratio=-1"], "tokens_ratio must be a positive number"),
    (["info", "spec:patch4 / convnext:1x99999999999"], "width 99999999999"),
    (["info", "nano_vit", "--in-chans", "-1"], "in_chans must be an integer from 1"),
    (["info", "nano_convnext", "--img-size", "-5"], "img_size must be an integer from 1"),
    (["info", "nano_vit", "--num-classes", "-2"], "num_classes must be an integer >= 0"),
    (["scale", "nano_vit", "--device", "tpu"], "device 'tpu' is not one of auto | cpu | cuda | cuda:N | mps"),
    (["eval", "RUN", "--device", "tpu"], "device 'tpu' is not one of"),
    (["train", "--model", "nano_vit", "--device", "tpu", "--output", "OUT"], "device 'tpu' is not one of"),
    (["train", "--model", "nano_vit", "--device", "cuda:x", "--output", "OUT"], "device 'cuda:x' is not one of"),
    (["train", "--model", "spec:patch0 / convnext:1x8", "--output", "OUT"], "stem size 0"),
    (["train", "--model", "nano_vit", "--set", "model.kwargs.in_chans=0", "--output", "OUT"],
     "model.kwargs.in_chans: the trainer sets in_chans from the dataset's channels"),
    (["train", "--model", "nano_vit", "--set", "model.kwargs.img_size=64", "--output", "OUT"], "set that instead"),
    (["train", "--model", "nano_vit", "--set", "checkpoint.every_steps=-1", "--output", "OUT"],
     "checkpoint.every_steps must be 0"),
    (["train", "--model", "nano_vit", "--img-size", "0", "--output", "OUT"], "data.img_size must be at least 1"),
    (["arena", "nano_vit", "--img-size", "0", "--out", "OUT"], "data.img_size must be at least 1"),
    (["arena", "nano_vit", "--device", "tpu", "--out", "OUT"], "device 'tpu' is not one of"),
    (["arena", "nano_vit", "--data", "cifar10", "--data-root", "NOWHERE", "--img-size", "32", "--out", "OUT"],
     "cifar10 not found"),
    (["eval", "RUN", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["info", "BROKEN.yaml"], "not valid YAML (line 3, column"),
    (["train", "BROKEN.yaml", "--output", "OUT"], "not valid YAML (line 3, column"),
])
def test_bad_input_is_one_line_status_2_and_writes_nothing(argv, says, tmp_path, monkeypatch, capsys, trained_run):
    monkeypatch.chdir(tmp_path)
    Path("BROKEN.yaml").write_text("model:\n  name: [nano_vit\n data: {\n")
    subs = {"OUT": str(tmp_path / "out"), "RUN": str(trained_run), "NOWHERE": str(tmp_path / "nowhere")}
    argv = [subs.get(a, a) for a in argv]
    if argv[0] == "train":
        argv += ["--data", "digits", "--epochs", "1"] + QUICK
    before = sorted(p.name for p in tmp_path.iterdir())
    run_before = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*")}
    assert main(argv) == 2
    assert says in _one_line_error(capsys, argv[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run or arena directory, no checkpoints/
    assert {p: p.stat().st_mtime_ns for p in trained_run.rglob("*")} == run_before  # the run read, not written


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    # the whole validation split (what evaluating a weights file outside the run uses)
    assert main(["train", "--model", TINY, "--data", "digits", "--epochs", "1", "--output", str(out), "--name", "r",
                 "--set", "log.progress=\"false\"", "--set", "data.limit_train=128", "--batch-size", "32"]) == 0
    return out / "r"


def test_eval_of_a_weights_file_outside_a_run(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes((trained_run / "checkpoints" / "best.safetensors").read_bytes())
    capsys.readouterr()
    assert main(["eval", "w.safetensors"]) == 2  # which data? it says how to name it
    assert "not inside a mixlab run" in _one_line_error(capsys, "eval")
    assert main(["eval", "w.safetensors", "--data", "digits", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main(["eval", str(trained_run), "--json"]) == 0
    in_run = json.loads(capsys.readouterr().out)
    assert alone["top1"] == in_run["top1"] and alone["loss"] == pytest.approx(in_run["loss"])
    assert alone["model"] == in_run["model"] == TINY
    assert not (tmp_path / "checkpoints").exists()  # reading creates nothing


def test_a_training_step_beyond_the_machine_is_refused_before_anything_is_written(tmp_path, capsys):
    assert main(["train", "--model", "nano_convnext", "--data", "digits", "--img-size", "8000", "--batch-size", "64",
                 "--output", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys, "train")
    assert "GiB for its activations" in err and "smaller data.img_size" in err
    assert not (tmp_path / "out").exists()


def test_an_allocator_error_is_one_line(monkeypatch, capsys):
    def oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 1000000000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(cli, "cmd_info", oom)
    assert main(["info", "nano_vit"]) == 2
    assert "out of memory" in _one_line_error(capsys, "info")


# -- operating-system errors: status 4 ---------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "arena", "convert", "erf"])
def test_an_output_path_under_a_file_is_status_4(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("a_file").write_text("")
    argv = {"train": ["train", "--model", TINY, "--data", "digits", "--epochs", "1", "--output", "a_file/x"] + QUICK,
            "arena": ["arena", TINY, "--epochs", "1", "--out", "a_file/x"],
            "convert": ["convert", "src.pth", "a_file/x.safetensors", "--model", TINY],
            "erf": ["erf", TINY, "--images", "1", "--out", "a_file/x"]}[command]
    if command == "convert":
        from mixlab import create_model
        torch.save(create_model(TINY).state_dict(), "src.pth")
    capsys.readouterr()
    assert main(argv) == 4
    err = _one_line_error(capsys, command)
    assert ("Not a directory" in err or "File exists" in err) and "a_file" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory_is_status_4(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["erf", TINY, "--images", "1", "--out", str(ro / "x")]) == 4
        assert "Permission denied" in _one_line_error(capsys, "erf")
    finally:
        ro.chmod(0o700)


def test_a_full_disk_during_training_says_the_checkpoint_is_intact(monkeypatch, capsys):
    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints/ckpt-00000004.safetensors")
    monkeypatch.setattr(cli, "cmd_train", full)
    assert main(["train", "--model", "nano_vit"]) == 4
    err = _one_line_error(capsys, "train")
    assert "No space left on device" in err and "checkpoint is intact" in err and "--resume" in err


@pytest.mark.parametrize("raised", [
    Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors' own
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),  # torch.save's
])
def test_a_full_disk_seen_by_a_file_writer_is_status_4(raised, monkeypatch, capsys):
    def full(args):  # what a checkpoint write on a full disk raises (watched on a 150 KB tmpfs)
        raise raised
    monkeypatch.setattr(cli, "cmd_train", full)
    assert main(["train", "--model", "nano_vit"]) == 4
    assert "--resume" in _one_line_error(capsys, "train")


def test_an_unexpected_error_shows_its_traceback_and_says_it_is_a_bug(monkeypatch, capsys):
    def broken(args):
        return 1 // 0
    monkeypatch.setattr(cli, "cmd_info", broken)
    assert main(["info", "nano_vit"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "a bug in mixlab" in err


def test_help_lists_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for line in ("2    bad usage or input", "3    training diverged", "4    an operating-system error",
                 "130  interrupted"):
        assert line in out


# -- Ctrl-C -------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sends SIGINT")
def test_ctrl_c_during_train_is_status_130_and_resume_continues(tmp_path):
    run_dir = tmp_path / "r"
    cmd = [sys.executable, "-m", "mixlab", "train", "--model", TINY, "--data", "digits", "--epochs", "3",
           "--output", str(tmp_path), "--name", "r", "--set", "checkpoint.every_steps=1", "--set",
           "log.progress=\"false\""] + QUICK
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not list((run_dir / "checkpoints").glob("ckpt-*.state.pt")) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "mixlab train: interrupted; `mixlab train --resume RUN_DIR` continues exactly from the last checkpoint" \
        in err
    assert not (run_dir / "summary.json").exists()
    done = subprocess.run([sys.executable, "-m", "mixlab", "train", "--resume", str(run_dir)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resum" in (done.stdout + done.stderr).lower()
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 3


# -- the arena's data ---------------------------------------------------------------------------------------
def test_an_arena_started_with_a_wrong_root_reruns_with_the_right_one(tmp_path):
    out = tmp_path / "a"
    wrong = ArenaSettings(models=[TINY], epochs=1, out=str(out), overrides=["data.limit_train=64"],
                          measure_speed=False)
    # what a failed first attempt of an earlier mixlab left: arena.json with its settings, a run that never trained
    from mixlab.arena.runner import _shared_settings, base_config, expand_models
    wrong.models = expand_models(wrong.models)
    (out / "runs" / "spec_x" / "seed0").mkdir(parents=True)
    (out / "runs" / "spec_x" / "seed0" / "config.yaml").write_text("stale: true\n")
    (out / "arena.json").write_text(json.dumps({"models": wrong.models,
                                                "shared": _shared_settings(wrong, base_config(wrong))}))
    right = ArenaSettings(models=[TINY], epochs=1, out=str(out), measure_speed=False,
                          overrides=["data.limit_train=128", "data.limit_val=64"])
    result = run_arena(right, quiet=True)
    assert not result["failed"]
    saved = json.loads((out / "arena.json").read_text())
    assert saved["shared"]["train_config"]["data"]["limit_train"] == 128
    assert not (out / "runs" / "spec_x" / "seed0" / "config.yaml").exists()  # the stale run's config went


# -- a JPEG cut short ---------------------------------------------------------------------------------------
def test_a_jpeg_cut_short_is_skipped_and_counted_by_the_scan(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for k in range(2):
                Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(folder / f"{k}.jpg", quality=90)
    whole = (tmp_path / "train" / "a" / "0.jpg").read_bytes()
    (tmp_path / "train" / "a" / "0.jpg").write_bytes(whole[:len(whole) // 2])
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        train, val, info = build_datasets("imagefolder", root=str(tmp_path), img_size=32)
    assert info.skipped == {"train": 1, "val": 0} and len(train) == 3
    for i in range(len(train)):  # every kept image decodes
        train[i]
