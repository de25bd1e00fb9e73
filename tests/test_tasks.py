"""The task protocol: a task registered here, unknown to the loop, trains, resumes exactly and picks
its best checkpoint by its own metric; unknown tasks are clear errors; run directories record their
task, and runs of earlier versions (no ``task`` key) are classification."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from mixlab.config import ConfigError, build_config, load_run_config
from mixlab.data import ResumableSampler, SeededDataset, build_datasets, build_transforms
from mixlab.engine.distributed import all_reduce_sum
from mixlab.engine.tasks import TASKS, ClassificationTask, Metric, Task, TaskData, register_task
from mixlab.engine.trainer import train
from mixlab.cli import main
from mixlab.runs import evaluate_run
from mixlab.weights import load_weights

FIXTURES = Path(__file__).parent / "fixtures" / "run-v0.1.0"
# the fixture's 0.01M-parameter spec model at 16 px: 128 training images are 4 steps of 32
SMALL = {
    "model": {"name": "spec:patch4 / convnext:1x8 / attention:1x16:heads=2"},
    "data": {"name": "digits", "limit_train": 128, "limit_val": 64, "img_size": 16},
    "train": {"epochs": 3, "batch_size": 32},
    "checkpoint": {"every_steps": 3, "keep_last": 2},
    "log": {"progress": "false", "print_every": 0},
}


class Interrupted(Exception):
    pass


class MeanPixel(Task):
    """A toy regression: the model's single output learns the mean pixel of its input image."""

    name = "test_mean_pixel"
    metric = Metric("val_mse", "validation MSE", "min", "", ".4f")
    interrupt_after: int | None = None  # micro-batches before a simulated kill
    seen = 0

    def data_info(self):
        d = self.cfg.data
        info = build_datasets(d.name, img_size=d.img_size, limit_train=d.limit_train, limit_val=d.limit_val,
                              seed=self.cfg.train.seed)[2]
        return dataclasses.replace(info, num_classes=1)  # the model's outputs

    def build_data(self, with_train=True):
        d, seed, bs = self.cfg.data, self.cfg.train.seed, self.cfg.train.batch_size
        train_base, val_base, info = build_datasets(d.name, img_size=d.img_size, limit_train=d.limit_train,
                                                    limit_val=d.limit_val, seed=seed)
        tf = build_transforms(info, False, info.img_size)
        val_loader = DataLoader(SeededDataset(val_base, tf, seed=seed), batch_size=64)
        info = dataclasses.replace(info, num_classes=1)
        if not with_train:
            return TaskData(None, val_loader, None, info)
        sampler = ResumableSampler(len(train_base), seed=seed)
        loader = DataLoader(SeededDataset(train_base, tf, seed=seed), batch_size=bs, sampler=sampler, drop_last=True)
        return TaskData(loader, val_loader, sampler, info)

    def loss(self, model, batch, seed):
        if MeanPixel.interrupt_after is not None and MeanPixel.seen >= MeanPixel.interrupt_after:
            raise Interrupted
        MeanPixel.seen += 1
        x = batch[0].to(self.device)
        with self.autocast():
            out = model(x)
        return F.mse_loss(out[:, 0].float(), x.mean(dim=(1, 2, 3))), x.shape[0]

    @torch.no_grad()
    def evaluate(self, model, loader):
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        for x, _ in loader:
            x = x.to(self.device)
            err = model(x)[:, 0] - x.mean(dim=(1, 2, 3))
            sums += torch.tensor([float((err ** 2).sum()), len(x)], dtype=torch.float64)
        sums = all_reduce_sum(sums.to(self.device), self.dinfo).cpu()
        return {"mse": sums[0].item() / sums[1].item(), "images": int(sums[1].item())}

    def epoch_fields(self, metrics, ema=False):
        return {("ema_mse" if ema else "val_mse"): metrics["mse"]}

    def summary_fields(self, metrics):  # names the metric otherwise: the loop adds val_mse, which the arena reads
        return {"mse": metrics["mse"]}


@pytest.fixture
def mean_pixel():
    register_task(MeanPixel)
    MeanPixel.interrupt_after, MeanPixel.seen = None, 0
    yield MeanPixel
    del TASKS[MeanPixel.name]


def small(tmp_path, **top) -> dict:
    return {**json.loads(json.dumps(SMALL)), "output_dir": str(tmp_path), **top}


def test_a_registered_task_trains_resumes_exactly_and_picks_its_best_checkpoint(tmp_path, mean_pixel, capsys):
    cfg = build_config(small(tmp_path, task=mean_pixel.name, name="ref"))
    summary = train(cfg)
    ref = tmp_path / "ref"
    assert summary["task"] == mean_pixel.name == yaml.safe_load((ref / "config.yaml").read_text())["task"]
    assert summary["num_classes"] == 1 and "top1" not in summary and summary["steps"] == 12
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    mses = [r["val_mse"] for r in rows]
    assert len(mses) == 3 and len(set(mses)) == 3
    # the lowest validation error picks best.safetensors (the task's "min"), and eval measures it again
    best = json.loads((ref / "checkpoints" / "best.json").read_text())
    assert best["metric"] == summary["best_val_mse"] == min(mses)
    assert summary["val_mse"] == summary["mse"] == mses[-1]  # the metric's key, added by the loop
    assert best["epoch"] == 1 + mses.index(min(mses))
    assert evaluate_run(ref, device="cpu")["mse"] == pytest.approx(min(mses))
    assert main(["eval", str(ref)]) == 0  # the command shows the task's own metrics
    assert f"mse {min(mses):.4g}" in capsys.readouterr().out

    # killed after 7 of 12 steps (the newest checkpoint is step 6, mid epoch 2), then resumed
    mean_pixel.interrupt_after, mean_pixel.seen = 7, 0
    with pytest.raises(Interrupted):
        train(build_config(small(tmp_path, task=mean_pixel.name, name="killed")))
    killed = tmp_path / "killed"
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["step"] == 6
    mean_pixel.interrupt_after = None
    resumed = train(cfg, run_dir=killed, resume=True)
    a, _ = load_weights(ref / "checkpoints" / "ckpt-00000012.safetensors")
    b, _ = load_weights(killed / "checkpoints" / "ckpt-00000012.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["mse"] == summary["mse"] and resumed["best_val_mse"] == summary["best_val_mse"]

    # what reads class scores refuses the run, saying why
    from mixlab.analysis.common import load_model
    with pytest.raises(ConfigError, match="outputs no class scores; the analysis commands"):
        load_model(None, str(ref))


def test_unknown_task_is_a_clear_error_before_anything_is_written(tmp_path):
    cfg = build_config(small(tmp_path, task="segmentaton", name="bad"))
    with pytest.raises(ConfigError, match="unknown task 'segmentaton'; known tasks: .*classification"):
        train(cfg)
    assert not (tmp_path / "bad").exists()


def test_a_task_name_is_registered_once():
    class Other(ClassificationTask):
        pass
    with pytest.raises(ValueError, match="already registered"):
        register_task(Other)
    assert TASKS["classification"] is ClassificationTask


def test_run_of_an_earlier_version_is_classification():
    saved = yaml.safe_load((FIXTURES / "interrupted" / "config.yaml").read_text())
    assert "task" not in saved
    assert load_run_config(FIXTURES / "interrupted").task == "classification"


def _run_of_unknown_task(tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "complete", run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "task": "detection"}, sort_keys=False))
    return run


def test_eval_analysis_and_arena_read_the_task_of_a_run(tmp_path, capsys):
    from mixlab.analysis.common import load_model
    from mixlab.arena.runner import collect

    run = _run_of_unknown_task(tmp_path)
    assert main(["eval", str(run)]) == 2
    assert "unknown task 'detection'; known tasks: classification" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="task 'detection', which this mixlab does not know .*the analysis"):
        load_model(None, str(run))
    arena_runs = tmp_path / "arena"
    (arena_runs / "m").mkdir(parents=True)
    shutil.move(run, arena_runs / "m" / "seed0")
    with pytest.raises(ConfigError, match="task 'detection'.*the arena"):
        collect("m", [0], arena_runs, {}, {})
