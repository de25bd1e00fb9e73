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
from datetime import datetime, timezone
from pathlib import Path

import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..fileio import write_atomic

__all__ = ["write_report"]

DASH = "\u2014"
NO_DATA = "no finished runs yet"
CSV_COLUMNS = ["model", "label", "top1_mean", "top1_std", "best_top1_mean", "top1_per_seed", "finished_seeds",
               "seeds", "params", "gmacs", "train_images_per_s", "infer_images_per_s", "run_train_images_per_s",
               "peak_memory_mb", "wall_s", "status"]
TABLE_HEADER = ["rank", "model", "top-1 %", "params (M)", "GMACs", "train img/s", "infer img/s",
                "peak mem (MiB)", "wall/run (s)", "seeds"]


# ----------------------------------------------------------------------------- formatting
def _n_finished(r: dict) -> int:
    return len(r.get("finished_seeds") or [])


def _fmt_top1(r: dict) -> str:
    mean, std = r.get("top1_mean"), r.get("top1_std")
    if mean is None:
        return DASH
    if _n_finished(r) > 1 and std is not None:
        return f"{mean:.2f} \u00b1 {std:.2f}"
    return f"{mean:.2f}"


def _fmt_gmacs(g) -> str:
    if g is None:
        return DASH
    return f"{g:.3f}" if g == 0 or g >= 0.001 else f"{g:.2e}"


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    return DASH if x is None else format(x * scale, spec)


def _row(rank: str, r: dict) -> list[str]:
    return [rank, str(r.get("label") or r.get("model")), _fmt_top1(r), _fmt(r.get("params"), ".2f", 1e-6),
            _fmt_gmacs(r.get("gmacs")), _fmt(r.get("train_images_per_s"), ",.0f"),
            _fmt(r.get("infer_images_per_s"), ",.0f"), _fmt(r.get("peak_memory_mb"), ",.0f"),
            _fmt(r.get("wall_s"), ",.0f"), f"{_n_finished(r)}/{len(r.get('seeds') or [])}"]


def _table_rows(ranked: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and display rows; a ``notes`` column appears only when some status is not ``done``."""
    notes = any(r.get("status", "done") != "done" for r in ranked)
    header = TABLE_HEADER + (["notes"] if notes else [])
    rows = []
    for i, r in enumerate(ranked, 1):
        row = _row(str(i) if r.get("top1_mean") is not None else DASH, r)
        if notes:
            status = str(r.get("status", "done"))
            row.append("" if status == "done" else status)
        rows.append(row)
    return header, rows


def _summary(config: dict, results: list[dict]) -> str:
    data = str(config.get("data", "?"))
    if config.get("img_size") is not None:
        data += f" at {config['img_size']} px"
    seeds = config.get("seeds")
    seeds = ", ".join(str(s) for s in seeds) if isinstance(seeds, (list, tuple)) else str(seeds)
    kinds = sorted({str(r["peak_memory_kind"]) for r in results if r.get("peak_memory_kind")})
    speed = (f" · img/s: batches of {config['batch_size']} of random data, timed apart from the runs"
             if config.get("batch_size") else "")
    return (f"data: {data} · epochs: {config.get('epochs', '?')} · seeds: {seeds} · "
            f"recipe: {config.get('recipe', '?')} · peak memory: {', '.join(kinds) or 'not measured'}{speed}")


def _md_cell(s: str) -> str:
    return " ".join(s.replace("|", "\\|").split())


def _markdown(summary: str, ranked: list[dict]) -> str:
    header, rows = _table_rows(ranked)
    align = ["---:" if h not in ("model", "notes") else "---" for h in header]
    lines = [summary, "", "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    full = [(r.get("label"), r.get("model")) for r in ranked if r.get("label") and r.get("label") != r.get("model")]
    if full:  # shortened names: say in full what was trained
        lines += [""] + [f"- {_md_cell(str(label))}: `{_md_cell(str(model))}`" for label, model in full]
    against = _against_leader(ranked)
    if against and against[1]:
        lines += ["", _against_text(against[0]), "", "| " + " | ".join(AGAINST_HEADER) + " |",
                  "|---|---:|---:|---:|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in against[1]]
    return "\n".join(lines) + "\n"


def _csv(ranked: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    join = lambda xs: ";".join(str(x) for x in (xs or []))  # noqa: E731
    for r in ranked:
        row = {k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS}
        row.update(top1_per_seed=join(r.get("top1")), finished_seeds=join(r.get("finished_seeds")),
                   seeds=join(r.get("seeds")))
        writer.writerow(row)
    return buf.getvalue()


# ----------------------------------------------------------------------------- seeds
def _against_leader(ranked: list[dict]) -> tuple[str, list[list[str]]] | None:
    """Whether the seeds support each model's gap to the leader: the leader's name and, per
    other model with at least two finished seeds, [model, gap in top-1 points, Welch's t-test
    p-value on the per-seed top-1, seeds of each]. None when the leader has fewer than two seeds."""
    import math
    import warnings

    from scipy import stats

    done = [r for r in ranked if len(r.get("top1") or []) >= 2]
    if not done or done[0] is not ranked[0]:
        return None
    lead = done[0]
    rows = []
    for r in done[1:]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # zero variance in both: p undefined
            p = stats.ttest_ind(r["top1"], lead["top1"], equal_var=False).pvalue
        gap = sum(r["top1"]) / len(r["top1"]) - sum(lead["top1"]) / len(lead["top1"])
        rows.append([str(r.get("label") or r.get("model")), f"{gap:+.2f}",
                     DASH if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else "< 0.001"),
                     f"{len(r['top1'])} / {len(lead['top1'])}"])
    return str(lead.get("label") or lead.get("model")), rows


AGAINST_HEADER = ["model", "gap to #1 (top-1 points)", "p (Welch's t-test)", "seeds (model / #1)"]


def _against_text(leader: str) -> str:
    return (f"Against the leader, {leader}: Welch's t-test on the top-1 of the finished seeds; a small p "
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


def _style(ax, title: str, xlabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val top-1 (%)")
    ax.grid(True, alpha=0.3)


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, NO_DATA, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _single_plot(draw, results: list[dict], colours: list) -> bytes:
    """One plot as its own PNG, its legend outside the axes."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    if draw(ax, results, colours):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    else:
        _no_data(ax)
    return _png(fig)


def _draw_epochs(ax, results: list[dict], colours: list) -> bool:
    _style(ax, "Validation accuracy during training", "epoch")
    drawn = False
    for r, colour in zip(results, colours):
        per_epoch: dict[float, list[float]] = {}
        curves = [c for c in (r.get("curves") or {}).values() if c]
        for curve in curves:
            for epoch, acc in curve:
                per_epoch.setdefault(epoch, []).append(acc)
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


def _draw_gmacs(ax, results: list[dict], colours: list) -> bool:
    _style(ax, "Accuracy vs compute", "GMACs per image")
    pts = [(r["gmacs"], r["top1_mean"], r.get("top1_std"), r.get("label") or r.get("model"), c)
           for r, c in zip(results, colours) if r.get("top1_mean") is not None and r.get("gmacs") is not None]
    return _scatter(ax, pts, log_x=True)


def _draw_throughput(ax, results: list[dict], colours: list) -> bool:
    done = [(r, c) for r, c in zip(results, colours) if r.get("top1_mean") is not None]
    use_infer = any(r.get("infer_images_per_s") for r, _ in done) and (
        all(r.get("infer_images_per_s") for r, _ in done) or not any(r.get("train_images_per_s") for r, _ in done))
    key, what = ("infer_images_per_s", "inference") if use_infer else ("train_images_per_s", "training")
    _style(ax, "Accuracy vs throughput", f"{what} throughput (images/s)")
    pts = [(r[key], r["top1_mean"], r.get("top1_std"), r.get("label") or r.get("model"), c)
           for r, c in done if r.get(key)]
    return _scatter(ax, pts, log_x=True)


def _overview(title: str, summary: str, ranked: list[dict], results: list[dict], colours: list) -> bytes:
    """The whole report as one picture: the leaderboard above the three plots, each model in
    the same colour in the table and in every plot."""
    header, rows = _table_rows(ranked)
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
        if not draw(ax, results, colours):
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


def _html(title, summary, ranked, pngs, config, environment) -> str:
    esc = html.escape
    header, rows = _table_rows(ranked)
    left = {1} | ({len(header) - 1} if header[-1] == "notes" else set())
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>", f"<p>{esc(summary)}</p>",
             "<h2>Leaderboard</h2>", _html_table(header, rows, left)]
    specs = [(str(r.get("label")), str(r.get("model"))) for r in ranked if r.get("label") != r.get("model")]
    if specs:
        parts += ["<h2>Models</h2>", _html_table(["label", "model"], [list(s) for s in specs], {0, 1})]
    against = _against_leader(ranked)
    if against and against[1]:
        parts += ["<h2>Seeds: is the gap real?</h2>", f"<p>{esc(_against_text(against[0]))}</p>",
                  _html_table(AGAINST_HEADER, against[1], {0})]
    parts.append("<h2>Plots</h2>")
    for name, png in pngs.items():
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f'<div><img alt="{esc(name)}" src="data:image/png;base64,{b64}"></div>')
    config_yaml = yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False, allow_unicode=True)
    parts += ["<h2>Configuration</h2>", f"<pre>{esc(config_yaml)}</pre>", "<h2>Environment</h2>",
              _html_table(["", ""], [[str(k), str(v)] for k, v in environment.items()], {0, 1})]
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts.append(f'<p class="muted">Generated {esc(stamp)} by mixlab arena.</p></body></html>')
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- entry point
def write_report(out_dir, results: list[dict], config: dict, environment: dict,
                 title: str = "mixlab arena") -> dict:
    """Write the arena report into ``out_dir`` (created if needed); return the written paths.

    ``results`` holds one dict per model, in the user's order: ``model``, ``label``, ``params``,
    ``gmacs``, ``seeds``, ``finished_seeds``, ``top1`` (per finished seed), ``top1_mean``,
    ``top1_std``, ``best_top1_mean``, ``train_images_per_s``, ``infer_images_per_s``,
    ``peak_memory_mb``, ``peak_memory_kind``, ``wall_s``, ``curves`` ({seed: [[epoch, top1], ...]})
    and ``status``; any measurement may be ``None``. ``config`` is the arena's JSON-able settings
    and ``environment`` a flat dict of strings. The returned dict maps ``markdown``, ``csv``,
    ``html``, ``json`` and ``plots`` (``epoch``, ``gmacs``, ``throughput``) to file paths (str).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # stable sort: best mean accuracy first, models without a finished seed last, ties keep user order
    ranked = sorted(results, key=lambda r: (r.get("top1_mean") is None, -(r.get("top1_mean") or 0.0)))
    colours = _colours(len(results))  # by the user's order, so a model keeps its colour in every plot
    summary = _summary(config, results)

    pngs = {"acc_vs_epoch.png": _single_plot(_draw_epochs, results, colours),
            "acc_vs_gmacs.png": _single_plot(_draw_gmacs, results, colours),
            "acc_vs_throughput.png": _single_plot(_draw_throughput, results, colours)}
    for name, png in pngs.items():
        write_atomic(out / name, png)
    files = {"markdown": out / "leaderboard.md", "csv": out / "leaderboard.csv",
             "json": out / "results.json", "html": out / "index.html"}
    write_atomic(files["markdown"], _markdown(summary, ranked))
    write_atomic(files["csv"], _csv(ranked))
    payload = {"config": config, "environment": environment, "results": results}
    write_atomic(files["json"], json.dumps(payload, indent=2, default=str) + "\n")
    write_atomic(files["html"], _html(title, summary, ranked, pngs, config, environment))
    files["overview"] = out / "report.png"  # a picture of the whole report, for slides and READMEs
    write_atomic(files["overview"], _overview(title, summary, ranked, results, colours))

    paths = {k: str(v) for k, v in files.items()}
    paths["plots"] = {k: str(out / n) for k, n in zip(("epoch", "gmacs", "throughput"), pngs)}
    return paths
