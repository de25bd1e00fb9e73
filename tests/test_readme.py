"""The README is the front door: its Python quickstart runs, its model table is measured,
and its test command is the one .ci/run runs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import mixlab
from mixlab.analysis import count_macs, count_params

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no Python quickstart"
    torch.manual_seed(0)
    exec(compile(blocks[0], "README quickstart", "exec"), {})


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = re.search(r"# 2\..*\n(.*)\n", README).group(1).strip()
    assert test_cmd in ci


def _table_rows(marker="model-table"):
    table = README.split(f"<!-- {marker}:start -->")[1].split(f"<!-- {marker}:end -->")[0]
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        yield cells[0].strip("`"), float(cells[1]), float(cells[2])


def test_model_table_lists_every_model():
    names = [r[0] for r in _table_rows()] + [r[0] for r in _table_rows("nano-table")]
    assert sorted(names) == mixlab.list_models()


@pytest.mark.parametrize("name,params,gmacs", list(_table_rows()))
def test_model_table_is_measured(name, params, gmacs):
    with torch.device("meta"):
        m = mixlab.create_model(name).eval()
        macs, _ = count_macs(m, torch.empty(1, 3, *m.img_size))
    assert round(count_params(m) / 1e6, 2) == params
    assert round(macs / 1e9, 2) == gmacs


@pytest.mark.parametrize("name,params,mmacs", list(_table_rows("nano-table")))
def test_nano_table_is_measured(name, params, mmacs):
    from mixlab.models.nano import NANO_SPECS, NANO_ZOO_CLASSES, NANO_ZOO_SPECS
    NANO_SPECS = {**NANO_SPECS, **NANO_ZOO_SPECS}
    with torch.device("meta"):
        m = mixlab.create_model(name).eval()
        macs, _ = count_macs(m, torch.empty(1, 3, *m.img_size))
    assert m.img_size == (32, 32) and m.num_classes == 10
    assert round(count_params(m) / 1e6, 2) == params
    assert round(macs / 1e6, 1) == mmacs
    assert name in NANO_ZOO_CLASSES or f"`{NANO_SPECS[name]}`" in README


def test_readme_arena_table_is_a_measured_report():
    """The digits leaderboard in the README is a run's output, not typed in: each row equals
    the row of the committed report (docs/arena-digits/, whose report.png is the README's picture)."""
    table = README.split("<!-- arena-digits:start -->")[1].split("<!-- arena-digits:end -->")[0]
    readme_rows = [ln for ln in table.strip().splitlines()[2:]]
    report = (ROOT / "docs" / "arena-digits" / "leaderboard.md").read_text()
    report_rows = [ln for ln in report.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(readme_rows) == len(report_rows) == 8
    for mine, theirs in zip(readme_rows, report_rows):
        assert mine.rstrip("|").rstrip() == theirs.rstrip("|").rstrip().rsplit("|", 1)[0].rstrip()  # minus seeds
    results = json.loads((ROOT / "docs" / "arena-digits" / "results.json").read_text())
    assert results["config"]["data"] == "digits" and results["environment"]["cpu cores"] == "2"
    assert "](docs/arena-digits/report.png)" in README and (ROOT / "docs" / "arena-digits" / "report.png").exists()


def test_readme_fashion_mnist_rows_are_the_committed_runs():
    """The Fashion-MNIST rows in the README are the summaries of the committed runs: one column
    per seed ("—" where that run has not finished), their mean ± standard deviation, ranked by the
    mean, and each model's gap to the leader with Welch's t-test p-value over the seeds."""
    import statistics
    import warnings

    from scipy import stats
    table = README.split("<!-- arena-fmnist:start -->")[1].split("<!-- arena-fmnist:end -->")[0]
    lines = table.splitlines()
    header = [c.strip() for c in next(ln for ln in lines if ln.startswith("| rank")).strip("|").split("|")]
    rows = [ln for ln in lines if ln.startswith("| ") and "| nano_" in ln]
    results = ROOT / "benchmarks" / "results" / "arena-fashion-mnist-10ep-3seed"
    assert len(rows) == 8 and {"seed 0", "seed 1", "seed 2", "top-1 %", "gap to #1", "p (Welch)"} <= set(header)
    tops = {}
    for rank, row in enumerate(rows, 1):
        cells = dict(zip(header, (c.strip() for c in row.strip("|").split("|"))))
        assert cells["rank"] == str(rank)
        tops[cells["model"]] = []
        for seed in range(3):
            path = results / "runs" / cells["model"] / f"seed{seed}" / "summary.json"
            if not path.exists():
                assert cells[f"seed {seed}"] == "—", (cells["model"], seed)
                continue
            summary = json.loads(path.read_text())
            assert summary["data"] == "fashion-mnist" and summary["epochs"] == 10
            assert f"  seed: {seed}\n" in (path.parent / "config.yaml").read_text()
            assert float(cells[f"seed {seed}"]) == round(summary["top1"], 2), (cells["model"], seed)
            assert float(cells["params (M)"]) == round(summary["params"] / 1e6, 2)
            tops[cells["model"]].append(summary["top1"])
        top = tops[cells["model"]]
        assert cells["top-1 %"] == f"{statistics.mean(top):.2f} ± {statistics.stdev(top):.2f}", cells["model"]
        lead = tops[next(iter(tops))]
        if rank == 1:
            assert cells["gap to #1"] == cells["p (Welch)"] == "—"
            continue
        assert statistics.mean(top) <= statistics.mean(list(tops.values())[-2]), "ranked by the mean"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p = stats.ttest_ind(top, lead, equal_var=False).pvalue
        assert cells["gap to #1"] == f"{statistics.mean(top) - statistics.mean(lead):+.2f}", cells["model"]
        assert cells["p (Welch)"] == (f"{p:.3f}" if p >= 0.001 else "< 0.001"), cells["model"]


def test_readme_zoo_arena_figures_are_the_committed_report():
    """The nano-zoo figures quoted in the README are rows of the committed report, which ranks
    exactly the nano-zoo line-up."""
    from mixlab.arena import expand_models
    report = ROOT / "docs" / "arena-digits-zoo"
    results = json.loads((report / "results.json").read_text())
    rows = {r["model"]: r for r in results["results"]}
    assert sorted(rows) == sorted(expand_models(["nano-zoo"]))
    assert results["config"]["data"] == "digits" and results["environment"]["cpu cores"] == "2"
    for name, label in (("nano_replknet", "RepLKNet"), ("nano_coatnet", "CoAtNet"), ("nano_vit_c", "ViT_C"),
                        ("nano_botnet", "BoTNet"), ("nano_convit", "ConViT"), ("nano_cait", "CaiT")):
        assert f"{label} {rows[name]['top1_mean']:.2f}%" in README, name


def test_readme_gallery_figures_are_the_committed_outputs():
    """The analysis gallery's pictures exist, and the numbers quoted beside them are in their JSON."""
    gallery = ROOT / "docs" / "gallery"
    for png in ("erf/erf.png", "affinity/affinity.png", "robustness/robustness.png", "scale/scale.png"):
        assert f"(docs/gallery/{png})" in README and (gallery / png).read_bytes()[:4] == b"\x89PNG"
    erf = json.loads((gallery / "erf" / "erf.json").read_text())["results"]
    large, small = (100 * r["area_ratio"]["0.5"] for r in erf[:2])
    assert f"{large:.1f}% of the\nimage for the large kernels, {small:.1f}% for the 3x3s" in README
    scale = {r["model"]: r["exponents"]["1"]["latency_tail"]
             for r in json.loads((gallery / "scale" / "scale.json").read_text())["results"]}
    assert f"as N^{scale['vit_tiny_patch16_224']:.2f} over the two largest sizes" in README
    assert (f"N^{scale['swin_tiny_patch4_window7_224']:.2f} and N^{scale['convnext_tiny']:.2f}" in README)
