"""``mixlab arena``: one recipe for a line-up of models, a report, and resumption after a kill."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import train_in_this_process

from mixlab.arena import ArenaSettings, expand_models, measure_speed, run_arena
from mixlab.arena.runner import DEFAULT_MODELS, model_label
from mixlab.cli import main
from mixlab.config import ConfigError

# a user-written hybrid: two convolution stages, then two attention stages
USER_SPEC = "spec:patch2 / convnext:1x16:kernel=3 / convnext:1x32:kernel=3 / attention:1x32:heads=2 / " \
            "attention:1x32:heads=2,downsample=none"
TINY = "spec:patch4 / convnext:1x16:kernel=3"
SMALL_DATA = ["--set", "data.limit_train=512", "--set", "data.limit_val=128", "--batch-size", "32"]


def _foreground_sigint() -> None:
    # as a command typed at a terminal has it: a test suite started in the background by a
    # non-interactive shell (nohup ... &) hands its children SIGINT ignored, and Python then
    # never raises KeyboardInterrupt, which the interrupt tests need
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _arena(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "mixlab", "arena", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_foreground_sigint, **kw)


def _children_of(pid: int) -> list[int]:
    """The child processes of ``pid``, started by any of its threads."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SIGKILL")
def test_killed_arena_resumes_without_redoing_finished_runs(tmp_path):
    out = tmp_path / "arena"
    args = ["nano_convnext", USER_SPEC, "--epochs", "3", "--out", str(out), "--set", "data.limit_train=256",
            "--set", "data.limit_val=64", "--batch-size", "32"]
    first = out / "runs" / "nano_convnext" / "seed0"
    proc = _arena(args)
    # wait until the first model has finished and the second has checkpointed an epoch, then kill -9
    deadline = time.time() + 240
    second = None
    while time.time() < deadline:
        if (first / "summary.json").exists():
            dirs = [d for d in (out / "runs").iterdir() if d.name != "nano_convnext"]
            if dirs and (dirs[0] / "seed0" / "checkpoints" / "latest.json").exists():
                second = dirs[0] / "seed0"
                break
        if proc.poll() is not None:
            pytest.fail(f"the arena ended before it could be killed:\n{proc.stdout.read()}")
        time.sleep(0.02)
    assert second is not None, "the arena did not reach the second model in time"
    child = _children_of(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (second / "summary.json").exists()
    for pid in child:  # the training child dies with the arena (no orphan racing the rerun)
        for _ in range(200):
            if not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text():
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"training process {pid} outlived the killed arena")
    finished = (first / "summary.json").read_text()
    finished_mtime = (first / "summary.json").stat().st_mtime_ns

    rerun = _arena(args)
    log, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log
    assert "nano_convnext seed 0] finished earlier, skipped" in log
    assert (first / "summary.json").read_text() == finished  # not redone
    assert (first / "summary.json").stat().st_mtime_ns == finished_mtime
    assert "resumed from ckpt-" in (second / "train.log").read_text()  # continued, not restarted
    rows = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]

    # the report covers both models, the user's spec beside the registered one
    for f in ("leaderboard.md", "leaderboard.csv", "index.html", "results.json", "acc_vs_epoch.png",
              "acc_vs_gmacs.png", "acc_vs_throughput.png", "report.png"):
        assert (out / f).stat().st_size > 0, f
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["nano_convnext", USER_SPEC]
    for r in results:
        assert r["status"] == "done" and r["finished_seeds"] == [0]
        assert 0 <= r["top1_mean"] <= 100 and r["params"] > 0 and r["gmacs"] > 0
        assert r["train_images_per_s"] > 0 and r["infer_images_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert len(r["curves"]["0"]) == 3
    md = (out / "leaderboard.md").read_text()
    assert "nano_convnext" in md and "attention:1x32" in md
    # every number in the leaderboard is the run's own
    s0 = json.loads((first / "summary.json").read_text())
    conv = next(r for r in results if r["model"] == "nano_convnext")
    assert conv["top1_mean"] == s0["top1"] and conv["params"] == s0["params"]


def test_arena_refuses_to_mix_settings_in_one_directory(tmp_path):
    out = tmp_path / "a"
    started = out / "runs" / "nano_vit" / "seed0"  # a run has trained under the saved settings: they are fixed
    started.mkdir(parents=True)
    (started / "summary.json").write_text("{}")
    (out / "arena.json").write_text(json.dumps({"models": ["nano_vit"], "shared": {"seeds": 1, "train_config": {}}}))
    with pytest.raises(ConfigError, match="holds an arena with other settings"):
        run_arena(ArenaSettings(models=[TINY], epochs=1, out=str(out)), quiet=True)
    assert [p.name for p in (out / "runs").iterdir()] == ["nano_vit"]


def test_bad_models_fail_before_anything_trains(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["arena", "nano_vitt", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nano_vitt'" in err and "nano_vit" in err
    assert main(["arena", "spec:patch4 / transformer:1x16", "--out", str(out)]) == 2
    assert "unknown mixer" in capsys.readouterr().err
    assert main(["arena", "nano_vit", "--seeds", "0", "--out", str(out)]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    assert not (out / "runs").exists()


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path, capsys):
    out = tmp_path / "c"
    code = main(["arena", TINY, "spec:patch4 / dwconv:1x16:kernel=3", "--epochs", "1", "--out", str(out),
                 "--set", "optimizer.lr=1e30", "--set", "optimizer.weight_decay=0", "--set", "data.limit_train=128",
                 "--set", "data.limit_val=64", "--set", "schedule.warmup_epochs=0", "--quiet", "--no-speed"])
    assert code == 1
    assert "failed" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())["results"]
    assert len(results) == 2
    for r in results:
        assert r["status"].startswith("failed: seed 0: diverged") and r["top1_mean"] is None
    assert "failed" in (out / "leaderboard.md").read_text()


def test_model_arguments():
    assert expand_models(None) == list(DEFAULT_MODELS)
    assert expand_models(["nano_vit", "nano", "x.yaml"]) == ["nano_vit"] + [m for m in DEFAULT_MODELS
                                                                            if m != "nano_vit"] + ["x.yaml"]
    assert model_label("configs/hybrid.yaml") == "hybrid"
    assert model_label("spec:patch2 / convnext:2x32") == "patch2 / convnext:2x32"
    assert len(model_label("spec:" + "patch2 / convnext:2x32" * 5)) <= 40


def test_speed_is_measured_for_inference_and_training():
    infer = measure_speed(TINY, img_size=28, in_chans=1, num_classes=10, batch_size=8, min_time=0.05)
    train = measure_speed(TINY, img_size=28, in_chans=1, num_classes=10, batch_size=8, min_time=0.05, train=True)
    assert 0 < train < infer < float("inf")  # a training step does a forward pass and more


def test_default_digits_arena_budget():
    from mixlab.arena.runner import DIGITS_EPOCHS, base_config
    cfg = base_config(ArenaSettings())
    assert cfg.data.name == "digits" and cfg.train.epochs == DIGITS_EPOCHS and cfg.data.img_size == 28
    assert cfg.recipe == "arena" and str(cfg.log.progress) == "false"


def test_report_only_trains_nothing(tmp_path, capsys, monkeypatch):
    from mixlab.arena import runner

    monkeypatch.setattr(runner, "train_in_child", train_in_this_process)
    out = tmp_path / "d"
    small = ["--epochs", "1", "--out", str(out), "--set", "data.limit_train=128", "--set", "data.limit_val=64",
             "--quiet", "--no-speed"]
    assert main(["arena", TINY, *small]) == 0
    summary = (out / "runs" / "spec-patch4-convnext-1x16-kernel-3" / "seed0" / "summary.json").read_text()
    assert main(["arena", TINY, "spec:patch4 / dwconv:1x16:kernel=3", "--report-only", *small]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["spec-patch4-convnext-1x16-kernel-3"]
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["status"] for r in results] == ["done", "0/1 seeds"]
    assert (out / "runs" / "spec-patch4-convnext-1x16-kernel-3" / "seed0" / "summary.json").read_text() == summary


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and signals")
def test_jobs_train_runs_side_by_side_and_an_interrupt_stops_them_all(tmp_path):
    """``--jobs 2``: two runs at a time, each child with half the cores; SIGINT to the arena alone
    stops both children (no run is marked failed) and a rerun continues both from their checkpoints."""
    from mixlab.arena.runner import child_threads

    out = tmp_path / "jobs"
    models = [TINY, "spec:patch4 / dwconv:1x16:kernel=3"]
    # a checkpoint every 4 of an epoch's 16 steps, and enough epochs, so that neither run can finish in
    # the time the other takes to reach its first checkpoint (a tiny epoch takes a fraction of a second,
    # and the two children need not start equally fast)
    epochs = 12
    args = [*models, "--epochs", str(epochs), "--out", str(out), "--jobs", "2", "--no-speed", *SMALL_DATA,
            "--set", "checkpoint.every_steps=4"]
    proc = _arena(args)
    deadline = time.time() + 240
    while time.time() < deadline:
        ready = [d for d in out.glob("runs/*/seed0") if (d / "checkpoints" / "latest.json").exists()]
        if len(ready) == 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"the arena ended before it could be interrupted:\n{proc.stdout.read()}")
        time.sleep(0.02)
    else:
        pytest.fail("the two runs did not both checkpoint in time")
    children = _children_of(proc.pid)
    assert len(children) == 2  # side by side
    proc.send_signal(signal.SIGINT)  # the arena only, not its process group
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log
    assert "FAILED" not in log and "interrupted" in log
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    runs = sorted(out.glob("runs/*/seed0"))
    assert len(runs) == 2 and not any((d / "summary.json").exists() for d in runs)

    rerun = _arena(args)
    log, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log
    assert "2 runs at a time" in log
    for d in runs:
        text = (d / "train.log").read_text()
        assert f"{child_threads(2)} CPU thread(s)" in text and "resumed from ckpt-" in text
        assert [json.loads(x)["epoch"] for x in (d / "metrics.jsonl").read_text().splitlines()] == list(
            range(1, epochs + 1))
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["model"] for r in results] == models and all(r["status"] == "done" for r in results)


def test_side_by_side_runs_are_spread_over_the_gpus(tmp_path, monkeypatch):
    """With several GPUs and device auto/cuda, each job slot has its own GPU (ids as
    CUDA_VISIBLE_DEVICES names them); a named device, one GPU or the CPU: no spreading."""
    import threading

    import torch

    from mixlab.arena import runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert runner.job_gpus("auto") == ["4", "6"] and runner.job_gpus("cuda") == ["4", "6"]
    assert runner.job_gpus("cuda:1") == [] and runner.job_gpus("cpu") == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert runner.job_gpus("auto") == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runner.job_gpus("auto") == []

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    lock, now, seen = threading.Lock(), set(), []

    def fake_train(rd, tag, quiet, threads, running, gpu):
        with lock:
            assert gpu not in now  # two runs at the same time never share a GPU
            now.add(gpu)
            seen.append((rd.name, gpu, threads))
        time.sleep(0.05)
        with lock:
            now.discard(gpu)
        return 0

    monkeypatch.setattr(runner, "train_in_child", fake_train)
    planned = [runner.PlannedRun("m", k, tmp_path / f"run{k}", f"[{k}]") for k in range(5)]
    started = []
    arena = runner.ArenaRun(ArenaSettings(jobs=2, device="auto"), base=None, out=tmp_path, quiet=True)
    monkeypatch.setattr(arena, "start", lambda run: started.append(run.seed))
    monkeypatch.setattr(arena, "failed", lambda *a: pytest.fail(f"no run fails here: {a}"))
    arena.train(planned)
    assert started == [0, 1, 2, 3, 4] and sorted(r for r, _, _ in seen) == [f"run{k}" for k in range(5)]
    assert {g for _, g, _ in seen} == {"0", "1"} and {t for _, _, t in seen} == {runner.child_threads(2)}


class _MeanPixel:
    """Built in a fixture (the task classes need torch and the data helpers): a toy regression task whose
    metric is lower-is-better, as tests/test_tasks.py's, which also writes its metric into summary.json."""


@pytest.fixture
def mean_pixel_task():
    import dataclasses

    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from mixlab.data import ResumableSampler, SeededDataset, build_datasets, build_transforms
    from mixlab.engine.tasks import TASKS, Metric, Task, TaskData, register_task

    class MeanPixel(Task):
        name = "test_arena_mean_pixel"
        metric = Metric("val_mse", "validation MSE", "min", "", ".4f")
        synthetic: list = []  # the batches synthetic_batch() gave (the arena's speed probe)
        synthetic_steps = 0  # loss() calls on one of them

        def _data(self):
            d = self.cfg.data
            return build_datasets(d.name, img_size=d.img_size, limit_train=d.limit_train, limit_val=d.limit_val,
                                  seed=self.cfg.train.seed)

        def data_info(self):
            return dataclasses.replace(self._data()[2], num_classes=1)

        def build_data(self, with_train=True):
            train_base, val_base, info = self._data()
            seed, tf = self.cfg.train.seed, build_transforms(info, False, info.img_size)
            val = DataLoader(SeededDataset(val_base, tf, seed=seed), batch_size=64)
            info = dataclasses.replace(info, num_classes=1)
            sampler = ResumableSampler(len(train_base), seed=seed)
            train = DataLoader(SeededDataset(train_base, tf, seed=seed), batch_size=self.cfg.train.batch_size,
                               sampler=sampler, drop_last=True)
            return TaskData(train, val, sampler, info)

        def synthetic_batch(self, n, info):
            MeanPixel.synthetic.append(super().synthetic_batch(n, info))
            return MeanPixel.synthetic[-1]

        def loss(self, model, batch, seed):
            x = batch[0].to(self.device)
            MeanPixel.synthetic_steps += any(batch is b for b in MeanPixel.synthetic)
            return F.mse_loss(model(x)[:, 0], x.mean(dim=(1, 2, 3))), x.shape[0]

        @torch.no_grad()
        def evaluate(self, model, loader):
            model.eval()
            err = [float(((model(x)[:, 0] - x.mean(dim=(1, 2, 3))) ** 2).sum()) for x, _ in loader]
            return {"mse": sum(err) / len(loader.dataset)}

        def epoch_fields(self, metrics, ema=False):
            return {("ema_mse" if ema else "val_mse"): metrics["mse"]}

        def summary_fields(self, metrics):
            return {"val_mse": metrics["mse"]}

    register_task(MeanPixel)
    yield MeanPixel
    del TASKS[MeanPixel.name]


def test_an_arena_ranks_by_its_tasks_metric_lower_is_better(tmp_path, monkeypatch, mean_pixel_task):
    """``--set task=...`` of a task with a "min" metric: per-seed values, means and curves are the metric's,
    the lowest mean ranks first, the table says the metric's label, the gap to the leader is tested on it,
    and the speed probe times the task's own step on its synthetic batch."""
    from scipy import stats

    from mixlab.arena import runner

    monkeypatch.setattr(runner, "train_in_child", train_in_this_process)
    out = tmp_path / "toy"
    models = [TINY, "spec:patch4 / dwconv:1x16:kernel=3"]
    s = ArenaSettings(models=models, epochs=2, seeds=2, out=str(out), batch_size=32,
                      overrides=["task=test_arena_mean_pixel", "data.limit_train=128", "data.limit_val=64"])
    result = run_arena(s, quiet=True)
    assert result["failed"] == []
    data = json.loads((out / "results.json").read_text())
    assert data["metric"] == {"key": "val_mse", "label": "validation MSE", "mode": "min", "unit": "", "fmt": ".4f"}
    assert data["config"]["task"] == "test_arena_mean_pixel"
    results = {r["model"]: r for r in data["results"]}
    for m in models:
        r = results[m]
        runs = [out / "runs" / runner.model_slug(m) / f"seed{k}" for k in (0, 1)]
        sums = [json.loads((d / "summary.json").read_text()) for d in runs]
        assert r["val_mse"] == [sm["val_mse"] for sm in sums] and "top1" not in r
        assert r["val_mse_mean"] == pytest.approx(sum(r["val_mse"]) / 2)
        assert r["best_val_mse_mean"] == pytest.approx(sum(sm["best_val_mse"] for sm in sums) / 2)
        rows = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
        assert r["curves"]["0"] == [[row["epoch"], row["val_mse"]] for row in rows if "val_mse" in row]
        assert len(r["curves"]["0"]) == 2
        assert r["train_images_per_s"] > 0 and r["infer_images_per_s"] > 0 and "train_speed_note" not in r
    # the probe's training step: the task's loss on its synthetic batch (2 warm-up and at least 3 timed, per model)
    assert [tuple(b[0].shape) for b in mean_pixel_task.synthetic] == [(32, 1, 28, 28)] * 2
    assert mean_pixel_task.synthetic_steps >= 10
    order = sorted(models, key=lambda m: results[m]["val_mse_mean"])  # ascending: lower is better
    md = (out / "leaderboard.md").read_text()
    header, *_ = [line for line in md.splitlines() if line.startswith("| rank")]
    assert "| validation MSE |" in header and "top-1" not in md
    table = [line for line in md.split("Against the leader")[0].splitlines() if line.startswith("| 1 ")
             or line.startswith("| 2 ")]
    assert [line.split(" | ")[1] for line in table] == [runner.model_label(m) for m in order]
    p = stats.ttest_ind(results[order[1]]["val_mse"], results[order[0]]["val_mse"], equal_var=False).pvalue
    assert f"Against the leader, {runner.model_label(order[0])}: Welch's t-test on the validation MSE" in md
    assert (f"{p:.3f}" if p >= 0.001 else "< 0.001") in md.split("Against the leader")[1]

    # a task that cannot take a step on random data: the model alone is timed, and the report says so
    (out / "speed.json").unlink()
    monkeypatch.setattr(mean_pixel_task, "synthetic_batch", lambda self, n, info: (_ for _ in ()).throw(
        RuntimeError("needs its data")))
    run_arena(ArenaSettings(**{**s.__dict__, "models": models[:1]}), quiet=True)
    r = json.loads((out / "results.json").read_text())["results"][0]
    assert r["train_images_per_s"] > 0 and "RuntimeError: needs its data" in r["train_speed_note"]
    assert "timed as the model alone" in (out / "leaderboard.md").read_text()
