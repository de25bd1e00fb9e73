"""The arena report: files, formatting, escaping and atomic rewriting."""
from __future__ import annotations

import base64
import csv
import html
import json
import os

import pytest

from mixlab.arena.report import _fmt_gmacs, _fmt_metric, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WEIRD = 'spec:patch2 / convnext:2x32, "fast" / attention:2x64:heads=2 <b>'


def _results():
    return [
        {"model": "nano_vit", "label": "nano_vit", "params": 1206000, "gmacs": 0.0822,
         "seeds": [0, 1, 2], "finished_seeds": [0], "top1": [91.234], "top1_mean": 91.234, "top1_std": 0.0,
         "best_top1_mean": 91.5, "train_images_per_s": 250.3, "infer_images_per_s": 1800.4,
         "peak_memory_mb": 612.0, "peak_memory_kind": "process peak RSS", "wall_s": 41.2,
         "curves": {"0": [[1, 80.1], [2, 91.234]], "1": [[1, 79.0]]}, "status": "1/3 seeds"},
        {"model": "broken.yaml", "label": "broken", "params": 500000, "gmacs": 0.0041,
         "seeds": [0, 1, 2], "finished_seeds": [], "top1": [], "top1_mean": None, "top1_std": None,
         "best_top1_mean": None, "train_images_per_s": None, "infer_images_per_s": None,
         "peak_memory_mb": None, "peak_memory_kind": None, "wall_s": None, "curves": {},
         "status": "failed: CUDA | out of memory\nat step 3"},
        {"model": WEIRD, "label": "hybrid", "params": 2345678, "gmacs": 0.1234,
         "seeds": [0, 1, 2], "finished_seeds": [0, 1], "top1": [97.2, 96.9], "top1_mean": 97.05,
         "top1_std": 0.2121320343559642, "best_top1_mean": 97.3, "train_images_per_s": 150.7,
         "infer_images_per_s": 1200.0, "peak_memory_mb": 700.5, "peak_memory_kind": "process peak RSS",
         "wall_s": 60.6, "curves": {"0": [[1, 85.0], [2, 97.2]], "1": [[1, 84.0], [2, 96.9]]},
         "status": "done"},
    ]


CONFIG = {"models": ["nano_vit", "broken.yaml", WEIRD], "data": "cifar10", "img_size": 32, "epochs": 2,
          "seeds": [0, 1, 2], "recipe": "arena",
          "train_config": {"optimizer": {"name": "adamw", "lr": 0.001}, "note": "a < b & c"}}
ENV = {"python": "3.11.7", "torch": "2.3.0+cpu", "mixlab": "0.9.1", "cpu": "Test CPU @ 9GHz", "device": "cpu"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("arena") / "report"
    paths = write_report(out, _results(), CONFIG, ENV, title="test arena")
    return out, paths


def _md_rows(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "")) <= {""}
    return header, [[c.strip() for c in line[2:-2].split(" | ")] for line in lines[2:]]


def test_every_file_exists_and_pngs_are_valid(report):
    out, paths = report
    names = {os.path.basename(p) for p in [paths["markdown"], paths["csv"], paths["html"], paths["json"],
                                           paths["overview"]]}
    assert names == {"leaderboard.md", "leaderboard.csv", "index.html", "results.json", "report.png"}
    assert {os.path.basename(p) for p in paths["plots"].values()} == {
        "acc_vs_epoch.png", "acc_vs_gmacs.png", "acc_vs_throughput.png"}
    assert set(paths["plots"]) == {"epoch", "gmacs", "throughput"}
    for p in [*paths["plots"].values(), paths["markdown"], paths["csv"], paths["html"], paths["json"]]:
        assert os.path.dirname(p) == str(out) and os.path.getsize(p) > 0
    for p in [*paths["plots"].values(), paths["overview"]]:
        data = open(p, "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000


def test_markdown_sorted_and_formatted(report):
    out, _ = report
    text = (out / "leaderboard.md").read_text()
    summary = text.splitlines()[0]
    assert "cifar10" in summary and "32" in summary and "epochs: 2" in summary
    assert "0, 1, 2" in summary and "arena" in summary and "process peak RSS" in summary
    header, rows = _md_rows(text)
    assert header[:3] == ["rank", "model", "top-1 %"] and header[-1] == "notes"
    assert all(len(r) == len(header) for r in rows)
    assert [r[1] for r in rows] == ["hybrid", "nano_vit", "broken"]
    assert [r[0] for r in rows] == ["1", "2", "\u2014"]
    hybrid, nano, broken = rows
    assert hybrid[2] == "97.05 \u00b1 0.21"
    assert nano[2] == "91.23"  # one finished seed: no ± part
    assert broken[2] == "\u2014"
    assert hybrid[3] == "2.35" and nano[4] == "0.082" and broken[4] == "0.004"
    assert nano[5] == "250" and nano[6] == "1,800" and hybrid[7] == "700" and hybrid[8] == "61"
    assert hybrid[9] == "2/3" and nano[9] == "1/3" and broken[9] == "0/3"
    assert hybrid[-1] == "" and nano[-1] == "1/3 seeds"
    # the failure message's pipe is escaped and its newline flattened: the table stays one row per model
    assert broken[-1].startswith("failed: CUDA \\| out of memory at step 3")
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert all(WEIRD not in ln for ln in table)  # labels, not long specs, in the pasteable table
    assert f"- hybrid: `{WEIRD}`" in text.splitlines()  # ... and below it, what each label stands for


def test_csv_round_trips(report):
    out, _ = report
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == [WEIRD, "nano_vit", "broken.yaml"]
    hybrid, nano, broken = rows
    assert float(hybrid["top1_std"]) == 0.2121320343559642  # full precision
    assert float(hybrid["top1_mean"]) == 97.05 and int(hybrid["params"]) == 2345678
    assert [float(x) for x in hybrid["top1_per_seed"].split(";")] == [97.2, 96.9]
    assert hybrid["finished_seeds"] == "0;1" and hybrid["seeds"] == "0;1;2"
    assert float(nano["gmacs"]) == 0.0822 and float(nano["infer_images_per_s"]) == 1800.4
    assert broken["top1_mean"] == "" and broken["finished_seeds"] == "" and broken["wall_s"] == ""
    assert broken["status"] == "failed: CUDA | out of memory\nat step 3"


def test_html_is_self_contained_and_escaped(report):
    out, paths = report
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    embedded = [base64.b64decode(chunk.split('"')[0]) for chunk in page.split("data:image/png;base64,")[1:]]
    assert sorted(embedded) == sorted(open(p, "rb").read() for p in paths["plots"].values())
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    assert "<title>test arena</title>" in page
    assert "<b>" not in page and html.escape(WEIRD) in page  # full spec shown, escaped
    assert "a &lt; b &amp; c" in page and "lr: 0.001" in page and "train_config:" in page
    for key, value in ENV.items():
        assert f"<td class=\"l\">{html.escape(key)}</td><td class=\"l\">{html.escape(value)}</td>" in page
    assert "97.05 \u00b1 0.21" in page and "Generated " in page


def test_results_json(report):
    out, _ = report
    data = json.loads((out / "results.json").read_text())
    assert data == {"config": CONFIG, "environment": ENV, "results": _results(),
                    "metric": {"key": "top1", "label": "top-1", "mode": "max", "unit": "%", "fmt": ".2f"}}


def test_no_temporary_files_left(report):
    out, _ = report
    assert sorted(os.listdir(out)) == sorted([
        "leaderboard.md", "leaderboard.csv", "index.html", "results.json",
        "acc_vs_epoch.png", "acc_vs_gmacs.png", "acc_vs_throughput.png", "report.png"])


def test_rewrite_overwrites_cleanly(tmp_path):
    results = _results()
    write_report(tmp_path, results, CONFIG, ENV)
    first = (tmp_path / "leaderboard.md").read_text()
    results[1].update(finished_seeds=[0], top1=[99.5], top1_mean=99.5, top1_std=0.0, status="1/3 seeds",
                      curves={"0": [[1, 99.5]]})
    paths = write_report(tmp_path, results, CONFIG, ENV)
    second = (tmp_path / "leaderboard.md").read_text()
    assert second != first and _md_rows(second)[1][0][1] == "broken"
    assert len(os.listdir(tmp_path)) == 8
    assert json.loads(open(paths["json"]).read())["results"][1]["top1_mean"] == 99.5


def test_empty_plots_still_written(tmp_path):
    r = _results()[1]
    paths = write_report(tmp_path / "a" / "b", [r], {"data": "mnist", "epochs": 1, "seeds": [0]}, {})
    for p in [*paths["plots"].values(), paths["overview"]]:
        assert open(p, "rb").read(8) == PNG_MAGIC
    assert "peak memory: not measured" in open(paths["markdown"]).read()


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    import mixlab.engine.checkpoint as atomic_mod  # where the atomic writer the report uses lives

    write_report(tmp_path, _results(), CONFIG, ENV)
    before = (tmp_path / "leaderboard.md").read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_mod.os, "replace", crash)
    results = _results()
    results[1]["label"] = "renamed"
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, results, CONFIG, ENV)
    monkeypatch.undo()
    assert len(os.listdir(tmp_path)) == 8  # the temporary file was removed
    assert (tmp_path / "leaderboard.md").read_text() == before


@pytest.mark.parametrize("r, expected", [
    ({"top1_mean": 97.049, "top1_std": 0.2049, "finished_seeds": [0, 1]}, "97.05 \u00b1 0.20"),
    ({"top1_mean": 50.0, "top1_std": 0.0, "finished_seeds": [0, 1, 2]}, "50.00 \u00b1 0.00"),
    ({"top1_mean": 88.8888, "top1_std": 0.0, "finished_seeds": [3]}, "88.89"),
    ({"top1_mean": None, "top1_std": None, "finished_seeds": []}, "\u2014"),
])
def test_top1_formatting(r, expected):
    assert _fmt_metric(r) == expected  # classification's top-1 by default


def test_gmacs_formatting():
    assert _fmt_gmacs(0.0822) == "0.082"
    assert _fmt_gmacs(4.49) == "4.490"
    assert _fmt_gmacs(0.00012) == "1.20e-04"
    assert _fmt_gmacs(None) == "\u2014"


def test_colours_are_distinct_and_table_text_readable():
    from mixlab.arena.report import _colours, _readable
    for n in (3, 8, 11, 19):
        cols = _colours(n)
        assert len(cols) == n and len({tuple(c) for c in cols}) == n
        for c in cols:
            r, g, b = _readable(c)[:3]
            assert 0.2126 * r + 0.7152 * g + 0.0722 * b <= 0.45 + 1e-9  # dark enough on white


def _seeded(name, top1):
    return {"model": name, "label": name, "params": 1e6, "gmacs": 0.02, "seeds": [0, 1, 2],
            "finished_seeds": list(range(len(top1))), "top1": top1,
            "top1_mean": sum(top1) / len(top1) if top1 else None, "top1_std": 0.1, "best_top1_mean": None,
            "train_images_per_s": 100.0, "infer_images_per_s": 500.0, "peak_memory_mb": 100.0,
            "peak_memory_kind": "process peak RSS", "wall_s": 10.0, "curves": {}, "status": "done"}


def test_the_gap_to_the_leader_is_tested_over_seeds(tmp_path):
    """Welch's t-test on the per-seed top-1 against the leader (t and its degrees of freedom
    computed here from the formula), for models with two seeds or more; no section while the
    leader has a single seed."""
    from scipy.stats import t as student_t

    lead, far, near, single = [93.1, 93.3, 93.2], [90.0, 90.4, 90.1], [93.0, 93.4, 92.9], [95.0]
    results = [_seeded("far", far), _seeded("lead", lead), _seeded("near", near), _seeded("single", single[:0])]
    results[3].update(top1=[91.0], finished_seeds=[0], top1_mean=91.0)
    write_report(tmp_path, results, CONFIG, ENV)
    text = (tmp_path / "leaderboard.md").read_text()
    assert "Against the leader, lead: Welch's t-test" in text
    section = text.split("Against the leader")[1]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in section.splitlines() if line.startswith("| "))}

    def welch_p(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        va, vb = (sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a),
                  sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b))
        t = (ma - mb) / (va + vb) ** 0.5
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
        return 2 * student_t.sf(abs(t), df), ma - mb

    for name, acc in (("far", far), ("near", near)):
        p, gap = welch_p(acc, lead)
        assert rows[name][0] == f"{gap:+.2f}" and rows[name][2] == "3 / 3"
        assert rows[name][1] == (f"{p:.3f}" if p >= 0.001 else "< 0.001")
    assert float(rows["near"][1]) > 0.5 and rows["far"][1] in ("< 0.001", "0.001", "0.002")
    assert "single" not in rows and "model" in rows  # the one-seed model is left out; the header row
    assert "Seeds: is the gap real?" in (tmp_path / "index.html").read_text()
    one = [_seeded("lead", [93.2]), _seeded("far", far)]  # the leader (by mean) has one seed: nothing to test
    one[0]["top1_mean"] = 99.0
    write_report(tmp_path / "one", one, CONFIG, ENV)
    assert "Welch" not in (tmp_path / "one" / "leaderboard.md").read_text()


def test_a_lower_is_better_metric_ranks_ascending_and_names_itself_everywhere(tmp_path):
    """A task's "min" metric (a toy regression's validation MSE): the lowest mean ranks first, the tables and
    plots name the metric by its label, values print in its format, Welch's p and the gap are computed on its
    per-seed values, the CSV's columns are named by its key and results.json records it."""
    from scipy import stats

    from mixlab.arena.report import rank, read_metric
    from mixlab.engine.tasks import Metric

    mse = Metric("val_mse", "validation MSE", "min", "", ".4f")

    def entry(name, values):
        r = _seeded(name, [])
        for k in ("top1", "top1_mean", "top1_std", "best_top1_mean"):
            r.pop(k)
        mean = sum(values) / len(values)
        return {**r, "finished_seeds": [0, 1, 2], "val_mse": values, "val_mse_mean": mean,
                "val_mse_std": stats.tstd(values), "best_val_mse_mean": min(values) - 0.001,
                "curves": {"0": [[1, values[0] + 0.1], [2, values[0]]]}}

    low, high, mid = [0.0101, 0.0103, 0.0102], [0.0530, 0.0510, 0.0550], [0.0201, 0.0199, 0.0204]
    results = [entry("high", high), entry("low", low), entry("mid", mid)]
    assert [r["model"] for r in rank(results, mse)] == ["low", "mid", "high"]
    assert [r["model"] for r in rank(results, Metric("val_mse", "x", "max"))] == ["high", "mid", "low"]
    paths = write_report(tmp_path, results, {**CONFIG, "task": "toy"}, ENV, metric=mse)
    text = (tmp_path / "leaderboard.md").read_text()
    assert text.startswith("task: toy · data: cifar10")
    header, rows = _md_rows(text.split("Against the leader")[0])
    assert header[2] == "validation MSE" and "top-1 %" not in text
    assert [r[1] for r in rows] == ["low", "mid", "high"] and [r[0] for r in rows] == ["1", "2", "3"]
    assert rows[0][2] == f"{sum(low) / 3:.4f} \u00b1 {stats.tstd(low):.4f}"
    section = text.split("Against the leader")[1]
    assert section.startswith(", low: Welch's t-test on the validation MSE of the finished seeds")
    assert "| model | gap to #1 (validation MSE) | p (Welch's t-test) | seeds (model / #1) |" in section
    gaps = {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")]
                                  for line in section.splitlines() if line.startswith("| ") and "gap" not in line)}
    for name, values in (("mid", mid), ("high", high)):
        p = stats.ttest_ind(values, low, equal_var=False).pvalue
        assert gaps[name][0] == f"{sum(values) / 3 - sum(low) / 3:+.4f}"  # positive: worse than the leader
        assert gaps[name][1] == (f"{p:.3f}" if p >= 0.001 else "< 0.001")
    with open(tmp_path / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["low", "mid", "high"]
    assert [float(x) for x in rows[0]["val_mse_per_seed"].split(";")] == low and "top1_mean" not in rows[0]
    data = json.loads(open(paths["json"]).read())
    assert read_metric(data) == mse and read_metric({"results": []}).key == "top1"  # older files: top-1
    page = (tmp_path / "index.html").read_text()
    assert "<th>validation MSE</th>" in page and "top-1" not in page
    from mixlab.arena.report import _ylabel
    assert _ylabel(mse) == "validation MSE (lower is better)"
    assert _ylabel(Metric("top1", "top-1", "max", "%")) == "val top-1 (%)"
