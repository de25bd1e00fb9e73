"""Compare the arms of an experiment, one arena directory each (``mixlab arena --out DIR``): the
same model trained from scratch, distilled, fine-tuned, probed ... Prints a Markdown table of each
arm's per-seed final value of the arenas' metric (top-1 for classification; the metric an arena's
``results.json`` records, as ``mixlab arena`` ranks by its task's metric), mean ± std (sample standard
deviation), and Welch's t-test of each arm against the first one; distilled students also get their two
heads' top-1 (class head, distillation head). Reads every run's ``summary.json`` under
``DIR/runs/MODEL/seed*``; runs not finished are left out and counted. Arms of different metrics are refused.

    python benchmarks/compare_arenas.py scratch=arena/scratch hard=arena/hard soft=arena/soft \
        --model nano_vit_distilled
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from pathlib import Path


#: the metric of an arena whose results.json records none (written before arenas recorded one, or not yet written)
TOP1 = {"key": "top1", "label": "top-1", "mode": "max", "unit": "%", "fmt": ".2f"}


def arm_metric(directory: Path) -> dict:
    """The metric the arena in ``directory`` ranks by (its results.json's ``metric``), top-1 by default."""
    path = directory / "results.json"
    metric = json.loads(path.read_text()).get("metric") if path.is_file() else None
    return metric or TOP1


def arm_runs(directory: Path, model: str) -> tuple[list[dict], int]:
    """The finished runs' summaries of ``model`` in an arena directory (by seed), and how many are not finished."""
    runs = sorted((directory / "runs" / model).glob("seed*"), key=lambda p: int(p.name[4:]))
    if not runs:
        raise SystemExit(f"{directory}: no runs of {model!r} (runs/{model}/seed*); models there: "
                         f"{', '.join(sorted(p.name for p in (directory / 'runs').glob('*'))) or 'none'}")
    done = [json.loads((r / "summary.json").read_text()) for r in runs if (r / "summary.json").is_file()]
    return done, len(runs) - len(done)


def mean_std(xs: list[float], fmt: str = ".2f") -> str:
    mean = format(statistics.mean(xs), fmt)
    return f"{mean} ± {format(statistics.stdev(xs), fmt)}" if len(xs) > 1 else mean


def welch(xs: list[float], ref: list[float]) -> str:
    from scipy import stats

    if len(xs) < 2 or len(ref) < 2:
        return "—"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance in both: p undefined
        p = stats.ttest_ind(xs, ref, equal_var=False).pvalue
    return "—" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else "< 0.001")


def table(arms: list[tuple[str, Path]], model: str) -> str:
    rows, ref, notes = [], None, []
    seeds = 0
    heads = False
    data = {}
    metric = arm_metric(arms[0][1])
    for label, directory in arms:
        if arm_metric(directory)["key"] != metric["key"]:
            raise SystemExit(f"{directory}: its arena ranks by {arm_metric(directory)['label']!r}, the first arm's by "
                             f"{metric['label']!r}; compare arms of one metric")
        done, unfinished = arm_runs(directory, model)
        if not done:
            raise SystemExit(f"{directory}: no finished run of {model!r} yet")
        if unfinished:
            notes.append(f"{label}: {unfinished} run(s) not finished, left out")
        data[label] = done
        seeds = max(seeds, len(done))
        heads = heads or any("top1_cls" in s for s in done)
    key, fmt = metric["key"], metric["fmt"]
    title = f"{metric['label']} {metric['unit']}" if metric["unit"] else metric["label"]
    header = ["arm"] + [f"seed {i}" for i in range(seeds)] + [title, "vs " + arms[0][0], "p (Welch)"]
    if heads:
        header += ["class head %", "dist. head %"]
    for label, _ in arms:
        if any(s.get(key) is None for s in data[label]):
            raise SystemExit(f"{label}: a finished run's summary.json has no {key!r} ({metric['label']})")
        values = [s[key] for s in data[label]]
        ref = ref or values
        gap = statistics.mean(values) - statistics.mean(ref)
        row = [label] + [format(t, fmt) for t in values] + ["—"] * (seeds - len(values))
        row += [mean_std(values, fmt), "—" if values is ref else format(gap, "+" + fmt),
                "—" if values is ref else welch(values, ref)]
        if heads:
            cls = [s["top1_cls"] for s in data[label] if "top1_cls" in s]
            dist = [s["top1_dist"] for s in data[label] if "top1_dist" in s]
            row += [mean_std(cls) if cls else "—", mean_std(dist) if dist else "—"]
        rows.append(row)
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + [f"\n{n}" for n in notes])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arms", nargs="+", metavar="LABEL=DIR",
                    help="an arena directory per arm; the first is the reference")
    ap.add_argument("--model", required=True, help="the model's run name in the arenas (runs/MODEL)")
    args = ap.parse_args(argv)
    arms = []
    for item in args.arms:
        label, eq, directory = item.partition("=")
        if not eq or not label or not directory:
            ap.error(f"{item!r}: give each arm as LABEL=DIR, e.g. scratch=arena/scratch")
        arms.append((label, Path(directory)))
    print(table(arms, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
