"""Render the report of a ``mixlab arena`` run from already-measured results.

:func:`write_report` takes one result dict per model (in the user's order), the
arena's exact configuration and a description of the environment, and writes
into ``out_dir``:

* ``leaderboard.md``   -- a clean Markdown table, ready to paste into a README, and (two
  seeds or more) each model's gap to the leader with Welch's t-test p-value over seeds;
* ``leaderboard.csv``  -- the same rows, full precision, machine-readable;
* ``acc_vs_epoch.png``, ``acc_vs_gmacs.png``, ``acc_vs_throughput.png``;
* ``index.html``       -- one self-contained page (plots embedded as data URIs);
* ``results.json``     -- configuration, environment and raw results.

Everything is about the arena's metric (its task's :class:`~mixlab.engine.tasks.Metric`: top-1 % for
classification, a loss for masked image modeling): the tables' column and the plots' axes name it by its
label and unit, its values are printed with its format, and models rank by its mean over the finished
seeds, highest first for a "max" metric and lowest first for a "min" one. The plots keep their file
names (``acc_vs_*.png``) whatever the metric, so that links to them stay valid.

Every file is written to a temporary file in ``out_dir`` and moved into place
with :func:`os.replace`, so an interrupted run never leaves a half-written file.
Plots are drawn on :class:`matplotlib.figure.Figure` with the Agg canvas, which
touches no pyplot global state.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..engine.tasks import ClassificationTask, Metric
from ..fileio import write_atomic

__all__ = ["write_report", "read_metric", "rank"]

DASH = "\u2014"
NO_DATA = "no finished runs yet"
#: the metric of results that name none: classification's top-1 (results written before tasks had metrics)
TOP1 = ClassificationTask.metric


def csv_columns(metric: Metric = TOP1) -> list[str]:
    """The CSV's columns: those of the metric are named by its key (``top1_mean``, ``val_loss_mean``, ...)."""
    k = metric.key
    return ["model", "label", f"{k}_mean", f"{k}_std", f"best_{k}_mean", f"{k}_per_seed", "finished_seeds",
            "seeds", "params", "gmacs", "train_images_per_s", "infer_images_per_s", "run_train_images_per_s",
            "peak_memory_mb", "wall_s", "status"]


def metric_title(metric: Metric = TOP1) -> str:
    """The metric's name with its unit, as a column header: "top-1 %", "reconstruction loss"."""
    return f"{metric.label} {metric.unit}" if metric.unit else metric.label


def table_header(metric: Metric = TOP1) -> list[str]:
    return ["rank", "model", metric_title(metric), "params (M)", "GMACs", "train img/s", "infer img/s",
            "peak mem (MiB)", "wall/run (s)", "seeds"]


def _mean(r: dict, metric: Metric):
    """A result's mean of the metric over its finished seeds (None: none finished)."""
    return r.get(f"{metric.key}_mean")


def _per_seed(r: dict, metric: Metric) -> list:
    return r.get(metric.key) or []


def rank(results: list[dict], metric: Metric = TOP1) -> list[dict]:
    """``results`` best first by the metric's mean (highest first for "max", lowest for "min"); models
    without a finished seed last; ties keep the user's order (a stable sort)."""
    sign = -1.0 if metric.mode == "max" else 1.0
    return sorted(results, key=lambda r: (_mean(r, metric) is None, sign * (_mean(r, metric) or 0.0)))


# ----------------------------------------------------------------------------- formatting
def _n_finished(r: dict) -> int:
    return len(r.get("finished_seeds") or [])


def _fmt_metric(r: dict, metric: Metric = TOP1) -> str:
    """The mean over the finished seeds, ± their sample standard deviation from two seeds on, in the
    metric's format (its unit is in the column's header)."""
    mean, std = _mean(r, metric), r.get(f"{metric.key}_std")
    if mean is None:
        return DASH
    if _n_finished(r) > 1 and std is not None:
        return f"{metric.format(mean, False)} \u00b1 {metric.format(std, False)}"
    return metric.format(mean, False)


def _fmt_gmacs(g) -> str:
    if g is None:
        return DASH
    return f"{g:.3f}" if g == 0 or g >= 0.001 else f"{g:.2e}"


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    return DASH if x is None else format(x * scale, spec)


def _row(rank: str, r: dict, metric: Metric) -> list[str]:
    return [rank, str(r.get("label") or r.get("model")), _fmt_metric(r, metric), _fmt(r.get("params"), ".2f", 1e-6),
            _fmt_gmacs(r.get("gmacs")), _fmt(r.get("train_images_per_s"), ",.0f"),
            _fmt(r.get("infer_images_per_s"), ",.0f"), _fmt(r.get("peak_memory_mb"), ",.0f"),
            _fmt(r.get("wall_s"), ",.0f"), f"{_n_finished(r)}/{len(r.get('seeds') or [])}"]


def _table_rows(ranked: list[dict], metric: Metric) -> tuple[list[str], list[list[str]]]:
    """Header and display rows; a ``notes`` column appears only when some status is not ``done``."""
    notes = any(r.get("status", "done") != "done" for r in ranked)
    header = table_header(metric) + (["notes"] if notes else [])
    rows = []
    for i, r in enumerate(ranked, 1):
        row = _row(str(i) if _mean(r, metric) is not None else DASH, r, metric)
        if notes:
            status = str(r.get("status", "done"))
            row.append("" if status == "done" else status)
        rows.append(row)
    return header, rows


def _summary(config: dict, results: list[dict]) -> str:
    task = config.get("task")
    task = f"task: {task} · " if task not in (None, "classification") else ""  # classification's line as before
    data = str(config.get("data", "?"))
    if config.get("img_size") is not None:
        data += f" at {config['img_size']} px"
    seeds = config.get("seeds")
    seeds = ", ".join(str(s) for s in seeds) if isinstance(seeds, (list, tuple)) else str(seeds)
    kinds = sorted({str(r["peak_memory_kind"]) for r in results if r.get("peak_memory_kind")})
    speed = (f" · img/s: batches of {config['batch_size']} of random data, timed apart from the runs"
             if config.get("batch_size") else "")
    return (f"{task}data: {data} · epochs: {config.get('epochs', '?')} · seeds: {seeds} · "
            f"recipe: {config.get('recipe', '?')} · peak memory: {', '.join(kinds) or 'not measured'}{speed}")


def _md_cell(s: str) -> str:
    return " ".join(s.replace("|", "\\|").split())


def _speed_notes(ranked: list[dict]) -> list[str]:
    """Where a model's training speed is not its task's own step (speed.json's note), why."""
    return [f"{r.get('label') or r.get('model')}: train img/s: {r['train_speed_note']}"
            for r in ranked if r.get("train_speed_note")]


PRETRAINING_HEADER = ["pretraining", "entries", "method", "epochs", "reconstruction loss", "best", "wall s"]
PRETRAINING_TEXT = ("Entries MODEL@METHOD are fine-tuned (MODEL@METHOD-probe: linearly probed) from a pretraining "
                    "of the model by masked image modeling, once per model and method: task mim, the method's "
                    "recipe, all the data's training images without their labels, seed 0.")


def _pretraining_rows(ranked: list[dict]) -> list[list[str]]:
    """One row per pretraining the entries start from (their ``pretraining`` field): its run directory, the
    entries that start from it, method, epochs, final and best validation reconstruction loss, wall time."""
    runs: dict[str, list] = {}
    for r in ranked:
        p = r.get("pretraining")
        if p:
            runs.setdefault(str(p.get("run")), [p, []])[1].append(str(r.get("label") or r.get("model")))
    rows = []
    for run, (p, entries) in runs.items():
        loss = lambda k: _fmt(p.get(k), ".4f")  # noqa: E731
        rows.append([Path(run).name, ", ".join(entries), str(p.get("method", "?")), str(p.get("epochs", DASH)),
                     loss("val_loss") if p.get("val_loss") is not None else "not finished", loss("best_val_loss"),
                     _fmt(p.get("wall_s"), ",.0f")])
    return rows


def _markdown(summary: str, ranked: list[dict], metric: Metric) -> str:
    header, rows = _table_rows(ranked, metric)
    align = ["---:" if h not in ("model", "notes") else "---" for h in header]
    lines = [summary, "", "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    full = [(r.get("label"), r.get("model")) for r in ranked if r.get("label") and r.get("label") != r.get("model")]
    if full:  # shortened names: say in full what was trained
        lines += [""] + [f"- {_md_cell(str(label))}: `{_md_cell(str(model))}`" for label, model in full]
    notes = _speed_notes(ranked)
    if notes:
        lines += [""] + [f"- {_md_cell(n)}" for n in notes]
    pre = _pretraining_rows(ranked)
    if pre:
        lines += ["", PRETRAINING_TEXT, "", "| " + " | ".join(PRETRAINING_HEADER) + " |",
                  "|---|---|---|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in pre]
    against = _against_leader(ranked, metric)
    if against and against[1]:
        lines += ["", _against_text(against[0], metric), "", "| " + " | ".join(against_header(metric)) + " |",
                  "|---|---:|---:|---:|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in against[1]]
    return "\n".join(lines) + "\n"


def _csv(ranked: list[dict], metric: Metric) -> str:
    buf = io.StringIO()
    columns = csv_columns(metric)
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    join = lambda xs: ";".join(str(x) for x in (xs or []))  # noqa: E731
    for r in ranked:
        row = {k: ("" if r.get(k) is None else r.get(k)) for k in columns}
        row.update({f"{metric.key}_per_seed": join(r.get(metric.key)), "finished_seeds": join(r.get("finished_seeds")),
                    "seeds": join(r.get("seeds"))})
        writer.writerow(row)
    return buf.getvalue()


# ----------------------------------------------------------------------------- seeds
def _against_leader(ranked: list[dict], metric: Metric = TOP1) -> tuple[str, list[list[str]]] | None:
    """Whether the seeds support each model's gap to the leader: the leader's name and, per
    other model with at least two finished seeds, [model, gap in the metric (the model's mean less the
    leader's: negative for a "max" metric, positive for a "min" one), Welch's t-test p-value on the
    per-seed values of the metric, seeds of each]. None when the leader has fewer than two seeds."""
    import math
    import warnings

    from scipy import stats

    done = [r for r in ranked if len(_per_seed(r, metric)) >= 2]
    if not done or done[0] is not ranked[0]:
        return None
    lead = done[0]
    ref = _per_seed(lead, metric)
    rows = []
    for r in done[1:]:
        xs = _per_seed(r, metric)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # zero variance in both: p undefined
            p = stats.ttest_ind(xs, ref, equal_var=False).pvalue
        gap = sum(xs) / len(xs) - sum(ref) / len(ref)
        rows.append([str(r.get("label") or r.get("model")), format(gap, "+" + metric.fmt),
                     DASH if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else "< 0.001"),
                     f"{len(xs)} / {len(ref)}"])
    return str(lead.get("label") or lead.get("model")), rows


def against_header(metric: Metric = TOP1) -> list[str]:
    """The gap table's header: a percentage's gap is in points ("top-1 points"), another's in its unit."""
    gap = f"{metric.label} points" if metric.unit == "%" else metric_title(metric)
    return ["model", f"gap to #1 ({gap})", "p (Welch's t-test)", "seeds (model / #1)"]


def _against_text(leader: str, metric: Metric = TOP1) -> str:
    return (f"Against the leader, {leader}: Welch's t-test on the {metric.label} of the finished seeds; a small p "
            f"(below 0.05, say) means the seeds support the gap, a large one that they cannot tell the two "
            f"apart (with three seeds only a large gap can be told).")


# ----------------------------------------------------------------------------- plots
def _colours(n: int) -> list:
    """One colour per model: tab10's ten, then (more than ten models) tab20's light shades of them."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    cmap = colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # tab20 pairs (dark, light): the dark ones first
    return [cmap(order[i % 20]) for i in range(n)]


def _readable(colour) -> tuple:
    """The colour darkened as far as needed to read as text on white (tab20's light shades are pale)."""
    r, g, b = colour[:3]
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    f = min(1.0, 0.45 / luminance) if luminance > 0 else 1.0
    return (r * f, g * f, b * f, 1.0)


def _text(s) -> str:
    """A label safe from matplotlib's mathtext (a ``$`` would start a formula)."""
    return str(s).replace("$", r"\$")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _ylabel(metric: Metric) -> str:
    """The plots' y axis: "val top-1 (%)", "val reconstruction loss (lower is better)"."""
    unit = f" ({metric.unit})" if metric.unit else ""
    return f"{_validation(metric.label, 'val')}{unit}" + (" (lower is better)" if metric.mode == "min" else "")


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _validation(name: str, word: str) -> str:
    """``name`` said to be measured on the validation set, unless it says so itself ("validation MSE")."""
    return name if name.lower().startswith("val") else f"{word} {name}"


def _style(ax, title: str, xlabel: str, metric: Metric) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_text(_ylabel(metric)))
    ax.grid(True, alpha=0.3)


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, NO_DATA, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _single_plot(draw, results: list[dict], colours: list, metric: Metric) -> bytes:
    """One plot as its own PNG, its legend outside the axes."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    if draw(ax, results, colours, metric):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    else:
        _no_data(ax)
    return _png(fig)


def _name(metric: Metric) -> str:
    """The metric's name in a plot's title: classification's reads "accuracy", as it did."""
    return "accuracy" if metric == TOP1 else metric.label


def _draw_epochs(ax, results: list[dict], colours: list, metric: Metric) -> bool:
    _style(ax, _text(_capital(_validation(_name(metric), "validation")) + " during training"), "epoch", metric)
    drawn = False
    for r, colour in zip(results, colours):
        per_epoch: dict[float, list[float]] = {}
        curves = [c for c in (r.get("curves") or {}).values() if c]
        for curve in curves:
            for epoch, value in curve:
                per_epoch.setdefault(epoch, []).append(value)
        if not per_epoch:
            continue
        epochs = sorted(per_epoch)
        mean = [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]
        ax.plot(epochs, mean, marker="o", markersize=3, color=colour, label=_text(r.get("label") or r.get("model")))
        if len(curves) > 1:  # the spread over seeds
            ax.fill_between(epochs, [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs],
                            color=colour, alpha=0.2, linewidth=0)
        drawn = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return drawn


def _scatter(ax, points: list[tuple], log_x: bool) -> bool:
    """``points``: (x, y, yerr, label, colour). Draws error-bar points, named in the legend
    (labels written beside the points overlap where models are close, as they often are)."""
    for x, y, err, label, colour in points:
        ax.errorbar([x], [y], yerr=[err or 0.0], fmt="o", color=colour, capsize=3, label=_text(label))
    ax.margins(x=0.15, y=0.15)
    xs = [p[0] for p in points]
    if log_x and xs and min(xs) > 0 and max(xs) / min(xs) > 30:
        ax.set_xscale("log")
    return bool(points)


def _draw_gmacs(ax, results: list[dict], colours: list, metric: Metric) -> bool:
    _style(ax, _text(f"{_capital(_name(metric))} vs compute"), "GMACs per image", metric)
    pts = [(r["gmacs"], _mean(r, metric), r.get(f"{metric.key}_std"), r.get("label") or r.get("model"), c)
           for r, c in zip(results, colours) if _mean(r, metric) is not None and r.get("gmacs") is not None]
    return _scatter(ax, pts, log_x=True)


def _draw_throughput(ax, results: list[dict], colours: list, metric: Metric) -> bool:
    done = [(r, c) for r, c in zip(results, colours) if _mean(r, metric) is not None]
    use_infer = any(r.get("infer_images_per_s") for r, _ in done) and (
        all(r.get("infer_images_per_s") for r, _ in done) or not any(r.get("train_images_per_s") for r, _ in done))
    key, what = ("infer_images_per_s", "inference") if use_infer else ("train_images_per_s", "training")
    _style(ax, _text(f"{_capital(_name(metric))} vs throughput"), f"{what} throughput (images/s)", metric)
    pts = [(r[key], _mean(r, metric), r.get(f"{metric.key}_std"), r.get("label") or r.get("model"), c)
           for r, c in done if r.get(key)]
    return _scatter(ax, pts, log_x=True)


def _overview(title: str, summary: str, ranked: list[dict], results: list[dict], colours: list,
              metric: Metric) -> bytes:
    """The whole report as one picture: the leaderboard above the three plots, each model in
    the same colour in the table and in every plot."""
    header, rows = _table_rows(ranked, metric)
    table_h = 0.8 + 0.3 * (len(rows) + 1)  # inches: the title lines, then one per table row
    fig = Figure(figsize=(15, table_h + 4.6))
    grid = fig.add_gridspec(2, 3, height_ratios=[table_h, 4.6], hspace=0.25, wspace=0.25)
    top = fig.add_subplot(grid[0, :])
    top.axis("off")
    top.set_title(f"{title}\n{summary}", fontsize="medium")
    if rows:
        table = top.table(cellText=[[_text(c) for c in row] for row in rows], colLabels=header, loc="center",
                          cellLoc="right", colLoc="right")
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        table.scale(1.0, 1.35)
        colour_of = {id(r): c for r, c in zip(results, colours)}
        table[0, 1].set_text_props(ha="left")
        for i, r in enumerate(ranked, start=1):
            cell = table[i, 1]
            cell.get_text().set_color(_readable(colour_of[id(r)]))
            cell.get_text().set_fontweight("bold")
            cell.set_text_props(ha="left")
        table.auto_set_column_width(list(range(len(header))))
    else:
        _no_data(top)
    for k, draw in enumerate((_draw_epochs, _draw_gmacs, _draw_throughput)):
        ax = fig.add_subplot(grid[1, k])
        if not draw(ax, results, colours, metric):
            _no_data(ax)
    return _png(fig)


# ----------------------------------------------------------------------------- html
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:13px}
img{max-width:100%;margin:0.5em 0}.muted{color:#666;font-size:90%}"""


def _html_table(header: list[str], rows: list[list[str]], left: set[int]) -> str:
    cls = lambda i: ' class="l"' if i in left else ""  # noqa: E731
    out = ["<table>", "<tr>" + "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(header)) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td{cls(i)}>{html.escape(str(c))}</td>" for i, c in enumerate(row)) + "</tr>")
    return "\n".join(out + ["</table>"])


def _html(title, summary, ranked, pngs, config, environment, metric: Metric) -> str:
    esc = html.escape
    header, rows = _table_rows(ranked, metric)
    left = {1} | ({len(header) - 1} if header[-1] == "notes" else set())
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>", f"<p>{esc(summary)}</p>",
             "<h2>Leaderboard</h2>", _html_table(header, rows, left)]
    parts += [f"<p class=\"muted\">{esc(n)}</p>" for n in _speed_notes(ranked)]
    specs = [(str(r.get("label")), str(r.get("model"))) for r in ranked if r.get("label") != r.get("model")]
    if specs:
        parts += ["<h2>Models</h2>", _html_table(["label", "model"], [list(s) for s in specs], {0, 1})]
    pre = _pretraining_rows(ranked)
    if pre:
        parts += ["<h2>Pretraining</h2>", f"<p>{esc(PRETRAINING_TEXT)}</p>",
                  _html_table(PRETRAINING_HEADER, pre, {0, 1, 2})]
    against = _against_leader(ranked, metric)
    if against and against[1]:
        parts += ["<h2>Seeds: is the gap real?</h2>", f"<p>{esc(_against_text(against[0], metric))}</p>",
                  _html_table(against_header(metric), against[1], {0})]
    parts.append("<h2>Plots</h2>")
    for name, png in pngs.items():
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f'<div><img alt="{esc(name)}" src="data:image/png;base64,{b64}"></div>')
    drawn = [(r, Path(r["picture"])) for r in ranked if r.get("picture") and Path(r["picture"]).is_file()]
    if drawn:  # the pictures a task draws of its runs (masked image modeling: originals, masked, reconstructed)
        parts += ["<h2>Pictures of the runs</h2>",
                  "<p class=\"muted\">Each model's newest picture, from its first finished seed's run, or for an "
                  "entry MODEL@METHOD that draws none from its pretraining (<code>pictures/</code> in the run "
                  "directory).</p>"]
        for r, path in drawn:
            b64 = base64.b64encode(path.read_bytes()).decode("ascii")
            label = str(r.get("label") or r.get("model"))
            parts += [f"<h3>{esc(label)}: {esc(path.name)}</h3>",
                      f'<div><img alt="{esc(label)}" src="data:image/png;base64,{b64}"></div>']
    config_yaml = yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False, allow_unicode=True)
    parts += ["<h2>Configuration</h2>", f"<pre>{esc(config_yaml)}</pre>", "<h2>Environment</h2>",
              _html_table(["", ""], [[str(k), str(v)] for k, v in environment.items()], {0, 1})]
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts.append(f'<p class="muted">Generated {esc(stamp)} by mixlab arena.</p></body></html>')
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- entry point
def write_report(out_dir, results: list[dict], config: dict, environment: dict,
                 title: str = "mixlab arena", metric: Metric | None = None) -> dict:
    """Write the arena report into ``out_dir`` (created if needed); return the written paths.

    ``metric`` is the arena's task's :class:`Metric` (default: classification's top-1); its key ``K`` names
    the fields of the results. ``results`` holds one dict per model, in the user's order: ``model``,
    ``label``, ``params``, ``gmacs``, ``seeds``, ``finished_seeds``, ``K`` (the metric per finished seed),
    ``K_mean``, ``K_std``, ``best_K_mean``, ``train_images_per_s``, ``infer_images_per_s``,
    ``peak_memory_mb``, ``peak_memory_kind``, ``wall_s``, ``curves`` ({seed: [[epoch, value], ...]}),
    ``status`` and, where the training speed is not the task's own step, ``train_speed_note``; an entry
    ``MODEL@METHOD`` has ``pretraining`` (``run``, ``method``, ``epochs``, ``val_loss``, ``best_val_loss``,
    ``wall_s``, ``probe``), listed in a table of its own; any
    measurement may be ``None``. ``config`` is the arena's JSON-able settings and ``environment`` a flat
    dict of strings. ``results.json`` records the metric once (``metric``: key, label, mode, unit, fmt).
    The returned dict maps ``markdown``, ``csv``, ``html``, ``json``, ``overview`` and ``plots``
    (``epoch``, ``gmacs``, ``throughput``) to file paths (str).
    """
    metric = metric or TOP1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranked = rank(results, metric)
    colours = _colours(len(results))  # by the user's order, so a model keeps its colour in every plot
    summary = _summary(config, results)

    pngs = {"acc_vs_epoch.png": _single_plot(_draw_epochs, results, colours, metric),
            "acc_vs_gmacs.png": _single_plot(_draw_gmacs, results, colours, metric),
            "acc_vs_throughput.png": _single_plot(_draw_throughput, results, colours, metric)}
    for name, png in pngs.items():
        write_atomic(out / name, png)
    files = {"markdown": out / "leaderboard.md", "csv": out / "leaderboard.csv",
             "json": out / "results.json", "html": out / "index.html"}
    write_atomic(files["markdown"], _markdown(summary, ranked, metric))
    write_atomic(files["csv"], _csv(ranked, metric))
    payload = {"config": config, "environment": environment, "metric": asdict(metric), "results": results}
    write_atomic(files["json"], json.dumps(payload, indent=2, default=str) + "\n")
    write_atomic(files["html"], _html(title, summary, ranked, pngs, config, environment, metric))
    files["overview"] = out / "report.png"  # a picture of the whole report, for slides and READMEs
    write_atomic(files["overview"], _overview(title, summary, ranked, results, colours, metric))

    paths = {k: str(v) for k, v in files.items()}
    paths["plots"] = {k: str(out / n) for k, n in zip(("epoch", "gmacs", "throughput"), pngs)}
    return paths


def read_metric(results_json: dict) -> Metric:
    """The metric a ``results.json`` (its parsed dict) was ranked by: its ``metric`` record, or
    classification's top-1 for one written before arenas recorded their metric."""
    return Metric(**results_json["metric"]) if results_json.get("metric") else TOP1
