"""The benchmark scripts: their shared timing (benchmarks/timing.py) and a toy-sized run of each,
so that a change to mixlab that breaks a benchmark is caught before someone needs its figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import timing  # noqa: E402
import vs_timm  # noqa: E402  (imports timm only inside its functions)


class FakeRunner:
    """Takes ``seconds[k]`` per batch in round k; records the order it was called in."""

    def __init__(self, name, per_round, log):
        self.name, self.per_round, self.log, self.warm = name, per_round, log, 0

    def step(self):
        self.warm += 1

    def time(self, iters):
        self.log.append(self.name)
        return iters * 8 / self.per_round[sum(1 for n in self.log if n == self.name) - 1]


def test_interleaved_rotates_the_order_and_takes_the_ratio_per_round():
    log = []
    runners = {"a": FakeRunner("a", [1.0, 2.0, 4.0], log), "b": FakeRunner("b", [2.0, 2.0, 2.0], log),
               "c": FakeRunner("c", [0.5, 1.0, 1.0], log)}
    seen = []
    out = timing.interleaved(runners, "b", repeats=3, iters=2, warmup=2, report=lambda r, got: seen.append(r))
    assert log == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # each goes first once
    assert all(r.warm == 2 for r in runners.values())
    assert seen == [0, 1, 2]
    # a: 16, 8, 4 img/s; b: 8 every round; c: 32, 16, 16
    assert out["img_s"] == {"a": 8.0, "b": 8.0, "c": 16.0}
    assert out["ratios"] == {"a": [2.0, 1.0, 0.5], "c": [4.0, 2.0, 2.0]}
    assert out["summary"]["a"] == {"ratio_min": 0.5, "ratio_median": 1.0, "ratio_max": 2.0}
    assert "b" not in out["ratios"]


def test_interleaved_rejects_an_unknown_reference_and_empty_rounds():
    runners = {"a": FakeRunner("a", [1.0], [])}
    with pytest.raises(ValueError, match="reference 'x' is not one of the runners"):
        timing.interleaved(runners, "x", repeats=1, iters=1, warmup=0)
    with pytest.raises(ValueError, match="repeats >= 1"):
        timing.interleaved(runners, "a", repeats=0, iters=1, warmup=0)


def test_runner_trains_and_infers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x = torch.randn(4, 3, 2, 2)
    infer = timing.Runner(model, x, "infer")
    assert not model.training and infer.step().shape == (4, 5)
    before = model[1].weight.detach().clone()
    train = timing.Runner(model, x, "train", num_classes=5)
    assert model.training and train.step() is None
    assert not torch.equal(before, model[1].weight)  # the SGD step moved the weights
    assert train.time(2) > 0
    with pytest.raises(ValueError, match="mode must be 'infer' or 'train'"):
        timing.Runner(model, x, "eval")


def run_script(name, *args, tmp_path, json_out=True):
    """Run ``benchmarks/NAME``; its stdout, and the result it wrote with ``--json`` (or None)."""
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(BENCH / name), *args, *(["--json", str(out)] if json_out else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, (json.loads(out.read_text()) if json_out else None)


def test_reparam_benchmark_runs(tmp_path):
    stdout, result = run_script("reparam.py", "--small", "--fuse", "--img-size", "32", "--batch", "1",
                                "--repeats", "2", "--warmup", "0", "--threads", "1", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"trained", "reparameterized", "fused"}
    assert rows["reparameterized"]["max_rel_deviation"] < 1e-4 and rows["fused"]["max_rel_deviation"] < 1e-4
    assert rows["reparameterized"]["params_m"] < rows["trained"]["params_m"]
    assert len(rows["fused"]["ratios"]) == 2 and "ratios" not in rows["trained"]
    assert "| reparameterized |" in stdout


def test_local_relation_benchmark_runs(tmp_path):
    stdout, _ = run_script("local_relation.py", "--batch", "2", "--repeats", "1", "--iters", "1", "--warmup", "0",
                           tmp_path=tmp_path, json_out=False)
    lines = [line for line in stdout.splitlines() if line.startswith("| nano_lrnet |")]
    assert len(lines) == 2  # train and infer
    deviation = float(lines[0].rstrip(" |").split("|")[-1])
    assert deviation < 1e-4  # both layers compute the same thing


def test_data_loading_benchmark_runs(tmp_path):
    stdout, result = run_script("data_loading.py", "--batch", "8", "--repeats", "2", "--iters", "2", "--warmup", "0",
                                tmp_path=tmp_path)
    assert result["max_abs_deviation"] == 0 and len(result["ratios"]) == 2  # the same batches, bit for bit
    assert set(result["img_s"]) == {"per-image", "batched"} and "| digits | 28 | 8 | 0 |" in stdout


def test_vs_timm_benchmark_runs(tmp_path):
    pytest.importorskip("timm")
    stdout, result = run_script("vs_timm.py", "--models", "resnet50", "--modes", "infer", "--img-size", "32",
                                "--batch", "1", "--repeats", "2", "--iters", "1", "--warmup", "0", "--no-memory",
                                "--threads", "1", tmp_path=tmp_path)
    (row,) = result["rows"]
    assert row["model"] == "resnet50" and row["mode"] == "infer" and len(row["ratios"]) == 2
    assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
    assert "timm " in result["environment"] and "| resnet50 | infer |" in stdout


def test_tensor_peak_growth_is_the_live_tensor_peak_of_one_step():
    """The --tensor-memory probe: a step that holds 16 MiB and 8 MiB at once, then frees both,
    peaks 24 MiB above where it started, whatever was alive before it."""
    before = torch.ones(1 << 20)  # alive throughout: not growth

    class Step:
        def step(self):
            a = torch.ones(4 << 20)  # 16 MiB of float32
            b = torch.ones(2 << 20)  # 8 MiB
            return float(a[0] + b[0])

    grown = vs_timm.tensor_peak_growth(Step())
    assert 24 <= grown < 25, grown
    assert before.sum() == 1 << 20


def test_vs_timm_tensor_memory_is_refused_without_memory_probes():
    out = subprocess.run([sys.executable, str(BENCH / "vs_timm.py"), "--tensor-memory", "--no-memory"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "cannot go with --no-memory" in out.stderr


def test_distill_cache_benchmark_runs(tmp_path):
    from mixlab.factory import create_model
    from mixlab.weights import checkpoint_metadata, save_weights
    kwargs = {"patch_size": 1, "dims": [8, 16], "depths": [1, 1]}  # a tiny ConvNeXt teacher for the 8x8 digits
    teacher = tmp_path / "teacher.safetensors"
    save_weights(create_model("convnext_tiny", num_classes=10, in_chans=1, img_size=8, **kwargs).state_dict(), teacher,
                 checkpoint_metadata("convnext_tiny", num_classes=10, in_chans=1, img_size=8, mean=[0.5], std=[0.5],
                                     crop_pct=1.0, interpolation="bicubic", model_kwargs=kwargs,
                                     classes=[str(i) for i in range(10)]))
    stdout, result = run_script("distill_cache.py", "--teacher", str(teacher), "--data", "digits", "--student",
                                "nano_resnet", "--limit-train", "64", "--batch", "16", "--repeats", "2", "--iters", "2",
                                "--warmup", "0", tmp_path=tmp_path)
    assert set(result["img_s"]) == {"uncached", "cached"} and len(result["ratios"]) == 2
    assert result["cache_images"] == 64 and "| nano_resnet |" in stdout


def test_mae_speed_benchmark_runs(tmp_path):
    stdout, result = run_script("mae_speed.py", "--models", "spec:patch4 / attention:1x32:heads=2,pos=abs",
                                "--img-size", "16", "--batch", "4", "--decoders", "32x1", "--repeats", "2", "--iters",
                                "1", "--warmup", "0", tmp_path=tmp_path)
    (r,) = result["results"]
    mae = "MAE 0.75, decoder 32x1"
    assert set(r["img_s"]) == {"full tokens", mae} and len(r["ratios"][mae]) == 2
    # the encoder of the MAE step runs on a quarter of the tokens: fewer MACs than the full step's encoder
    assert r["gmacs_forward"][mae] < r["gmacs_forward"]["full tokens"] * 1.5
    assert "| full tokens |" in stdout


def test_compare_arenas_reads_each_arms_runs_and_tests_them_against_the_first(tmp_path):
    import compare_arenas
    from scipy import stats

    arms = {"scratch": [79.0, 79.9, 79.4], "hard": [79.2, 79.4, 80.6], "soft": [80.0, 80.5]}
    for label, top1 in arms.items():
        for seed, t in enumerate(top1):
            run = tmp_path / label / "runs" / "vit" / f"seed{seed}"
            run.mkdir(parents=True)
            summary = {"top1": t, **({"top1_cls": t - 1, "top1_dist": t + 1} if label != "scratch" else {})}
            (run / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "soft" / "runs" / "vit" / "seed2").mkdir()  # a run not finished: left out, and said so
    out = compare_arenas.table([(k, tmp_path / k) for k in arms], "vit")
    lines = out.splitlines()
    assert lines[0].startswith("| arm | seed 0 | seed 1 | seed 2 | top-1 % | vs scratch | p (Welch) | class head %")
    hard = lines[3].split(" | ")
    assert hard[0] == "| hard" and hard[4] == "79.73 ± 0.76" and hard[5] == "+0.30"
    assert hard[6] == f"{stats.ttest_ind(arms['hard'], arms['scratch'], equal_var=False).pvalue:.3f}"
    assert hard[7] == "78.73 ± 0.76" and lines[4].split(" | ")[3] == "—"  # soft has two seeds
    assert "soft: 1 run(s) not finished, left out" in out
    with pytest.raises(SystemExit, match="no runs of 'deit'"):
        compare_arenas.table([("scratch", tmp_path / "scratch")], "deit")


def test_compare_arenas_uses_the_metric_the_arenas_record(tmp_path):
    """Arenas of a task with another metric (results.json's ``metric``): its key is read from the summaries,
    its label heads the column and its format prints the values; arms of different metrics are refused."""
    import compare_arenas

    metric = {"key": "val_mse", "label": "validation MSE", "mode": "min", "unit": "", "fmt": ".4f"}
    for label, values in {"a": [0.0101, 0.0103], "b": [0.0201, 0.0205]}.items():
        (tmp_path / label).mkdir()
        (tmp_path / label / "results.json").write_text(json.dumps({"metric": metric, "results": []}))
        for seed, v in enumerate(values):
            run = tmp_path / label / "runs" / "vit" / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({"val_mse": v, "top1": 50.0}))
    lines = compare_arenas.table([("a", tmp_path / "a"), ("b", tmp_path / "b")], "vit").splitlines()
    assert lines[0] == "| arm | seed 0 | seed 1 | validation MSE | vs a | p (Welch) |"
    assert lines[3].split(" | ")[:5] == ["| b", "0.0201", "0.0205", "0.0203 ± 0.0003", "+0.0101"]
    run = tmp_path / "c" / "runs" / "vit" / "seed0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"top1": 50.0}))
    with pytest.raises(SystemExit, match="ranks by 'top-1', the first arm's by 'validation MSE'"):
        compare_arenas.table([("a", tmp_path / "a"), ("c", tmp_path / "c")], "vit")
