"""
The morning report: read results.tsv, print the run at a glance, draw progress.png.

    uv run analysis.py [results.tsv] [--json] [--png progress.png | --no-png]

Noise rules (program.md): a row that repeats an earlier commit, or whose
description contains "(noise)", is a rerun, not an experiment. A commit's value
is the mean of its non-crash rows; the running best uses those means.
M = max - min of the baseline commit's rows (the first row is the baseline).
Kept gains smaller than M are marked "≈noise".
"""

import argparse
import json
import math
import os
import signal
import sys
import tempfile
from pathlib import Path

HEADER = ["commit", "val_bpb", "memory_gb", "status", "description"]
STATUSES = ("keep", "discard", "crash")
LABEL_CHARS = 28  # kept descriptions are cut to this length on the plot
MAX_LABELS = 20  # on a long night only the kept changes with the largest gains get a label


class ResultsError(Exception):
    """A results.tsv that cannot be read; the message is the one line to print."""


def parse_results(path):
    """Read results.tsv into a list of row dicts; raise ResultsError on any problem."""
    path, header = Path(path), "\\t".join(HEADER)
    if not path.is_file():
        raise ResultsError(f"{path}: no such file; pass the path to results.tsv "
                           "(uv run analysis.py path/to/results.tsv)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: cannot read it as UTF-8 text ({e}); check the file") from None
    if not text.strip():
        raise ResultsError(f"{path} line 1: file is empty; write the header '{header}' first")
    lines = [line.rstrip("\r") for line in text.split("\n")]  # not splitlines: it splits on \x0c etc.
    if lines[0].split("\t") != HEADER:
        raise ResultsError(f"{path} line 1: wrong header {lines[0]!r}; it must be exactly "
                           f"'{header}' (tab-separated)")
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{path} line {lineno}"
        if len(fields) != len(HEADER):
            raise ResultsError(f"{where}: {len(fields)} tab-separated columns, expected 5 "
                               f"({', '.join(HEADER)}); fix or delete the line")
        commit, val_bpb, memory_gb, status, description = fields
        if len(commit) < 7 or any(c not in "0123456789abcdef" for c in commit.lower()):
            raise ResultsError(f"{where}: commit {commit!r} is not a hex hash of 7+ characters; "
                               "use the short hash from git rev-parse --short HEAD")
        for name, field, example in (("val_bpb", val_bpb, "0.997900"), ("memory_gb", memory_gb, "44.0")):
            if not _is_number(field):
                raise ResultsError(f"{where}: {name} {field!r} is not a number; write e.g. {example} "
                                   "(0 for a crash)")
        if status not in STATUSES:
            raise ResultsError(f"{where}: unknown status {status!r}; use keep, discard or crash")
        rows.append(dict(line=lineno, commit=commit, val_bpb=float(val_bpb), memory_gb=float(memory_gb),
                         status=status, description=description))
    if not rows:
        raise ResultsError(f"{path}: no experiments yet (only the header); "
                           "run the baseline and log it first")
    return rows


def _is_number(text):
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def mark_reruns(rows):
    """Set row["rerun"] (repeats an earlier commit, or says "(noise)") and row["x"], the index
    of the row's experiment (baseline 0); a rerun shares the x of its commit's experiment."""
    seen, x_of = set(), {}
    for i, row in enumerate(rows):
        row["rerun"] = i > 0 and (row["commit"] in seen or "(noise)" in row["description"])
        seen.add(row["commit"])
        if not row["rerun"]:
            x_of[row["commit"]] = len(x_of)
        row["x"] = x_of.get(row["commit"], len(x_of) - 1)
    return rows


def summarize(rows):
    """The report as a plain dict (the --json object): counts, baseline, best, noise, kept changes."""
    commits = {}
    for row in mark_reruns(rows):  # group rows by commit
        c = commits.setdefault(row["commit"], dict(values=[], statuses=set()))
        c["statuses"].add(row["status"])
        if row["status"] != "crash":
            c["values"].append(row["val_bpb"])
    for c in commits.values():  # a commit is kept if any of its rows says keep
        c["mean"] = sum(c["values"]) / len(c["values"]) if c["values"] else None
        c["status"] = "keep" if "keep" in c["statuses"] else "discard" if c["values"] else "crash"

    base_commit = rows[0]["commit"]
    base = commits[base_commit]
    experiments = [r for r in rows[1:] if not r["rerun"]]
    counts = {s: sum(commits[r["commit"]]["status"] == s for r in experiments) for s in STATUSES}
    margin = max(base["values"]) - min(base["values"]) if len(base["values"]) >= 2 else None

    best_value, best_row, kept_changes = base["mean"], rows[0], []
    for index, row in enumerate(experiments, start=1):
        c = commits[row["commit"]]
        if c["status"] != "keep" or c["mean"] is None:
            continue
        gain = None if best_value is None else best_value - c["mean"]
        kept_changes.append(dict(
            index=index, commit=row["commit"], val_bpb=_r(c["mean"]), runs=len(c["values"]),
            description=row["description"], gain=_r(gain),
            within_noise=gain is not None and margin is not None and _r(gain) < _r(margin)))
        if best_value is None or c["mean"] < best_value:
            best_value, best_row = c["mean"], row

    improvement = None
    if base["mean"] is not None:
        absolute = base["mean"] - best_value
        improvement = dict(absolute=_r(absolute), percent=round(100 * absolute / base["mean"], 4),
                           multiple_of_margin=round(absolute / margin, 2) if margin else None)
    return dict(
        experiments=len(experiments), reruns=sum(r["rerun"] for r in rows),
        kept=counts["keep"], discarded=counts["discard"], crashed=counts["crash"],
        keep_rate=round(counts["keep"] / len(experiments), 4) if experiments else None,
        baseline=dict(commit=base_commit, val_bpb=_r(base["mean"]), description=rows[0]["description"]),
        best=dict(commit=best_row["commit"], val_bpb=_r(best_value), description=best_row["description"]),
        improvement=improvement,
        noise=dict(runs=len(base["values"]), margin=_r(margin), baseline_mean=_r(base["mean"])),
        kept_changes=kept_changes,
    )


def _r(x):
    """Round to the 6 decimals of results.tsv (None stays None)."""
    return None if x is None else round(x, 6)


def render_text(summary, path="results.tsv"):
    """The human-readable report."""
    s, noise, imp = summary, summary["noise"], summary["improvement"]
    n, runs = s["experiments"], noise["runs"]
    rate = "n/a" if s["keep_rate"] is None else f"{100 * s['keep_rate']:.0f}%"
    base_value = "crashed" if runs == 0 else f"{s['baseline']['val_bpb']:.6f}  ({runs} run{'s' * (runs > 1)})"
    best_value = "none" if s["best"]["val_bpb"] is None else f"{s['best']['val_bpb']:.6f}"
    out = [f"{path}: {n} experiment{'s' * (n != 1)} after the baseline ({s['reruns']} reruns not counted)",
           f"  kept {s['kept']}, discarded {s['discarded']}, crashed {s['crashed']}, keep rate {rate}",
           f"baseline     {s['baseline']['commit']}  {base_value}",
           f"best         {s['best']['commit']}  {best_value}  {s['best']['description']}"]
    if imp:
        times = f" = {imp['multiple_of_margin']:.1f} × M" if imp["multiple_of_margin"] is not None else ""
        out.append(f"improvement  {imp['absolute']:.6f} ({imp['percent']:.2f}%){times}")
    if noise["margin"] is None:
        out.append(f"noise        M not measured ({runs} baseline run{'s' * (runs != 1)}): rerun the "
                   "unchanged baseline with SEED=1 and SEED=2, same commit, described '(noise)'")
    else:
        out.append(f"noise        M = {noise['margin']:.6f} (max - min of {runs} baseline runs)")
    out.append("kept changes (gain over the previous best):" if s["kept_changes"] else "no kept changes yet")
    for k in s["kept_changes"]:
        gain = "      n/a" if k["gain"] is None else f"{k['gain']:+.6f}"
        mark = "≈noise" if k["within_noise"] else ""
        reruns = f"  (mean of {k['runs']} runs)" if k["runs"] > 1 else ""
        out.append(f"  #{k['index']:<3} {k['commit']}  {k['val_bpb']:.6f}  {gain}  {mark:6}  "
                   f"{k['description']}{reruns}")
    return "\n".join(out)


def plot_progress(rows, summary, png_path):
    """Draw val_bpb against the experiment index to png_path, written atomically."""
    # Imported here: matplotlib takes seconds to load, and errors or --no-png need none of it.
    # A bare Figure on an Agg canvas: no display, no pyplot state, the caller's backend untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    xs = [r["x"] for r in mark_reruns(rows)]
    kept = {k["commit"] for k in summary["kept_changes"]} | {summary["baseline"]["commit"]}
    base_vals = [r["val_bpb"] for r in rows if r["commit"] == rows[0]["commit"] and r["status"] != "crash"]
    values = [r["val_bpb"] for r in rows if r["status"] != "crash"] or [1.0]
    # Zoom on baseline..best: far-worse discards would squash the plot, so they sit on the top edge
    low, base_hi = min(values), max(base_vals or values)
    span = max(base_hi - low, 1e-3)
    top = min(max(values), base_hi + 0.5 * span) + 0.05 * span
    bottom = low - 0.75 * span  # room for the labels below the staircase

    fig = Figure(figsize=(12, 6.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    noise = summary["noise"]
    if noise["margin"] is not None:
        ax.axhspan(min(base_vals), max(base_vals), color="0.5", alpha=0.2, lw=0,
                   label=f"baseline noise, {noise['runs']} seeds, M = {noise['margin']:.4f}")
    for is_kept, color, name in ((False, "0.6", "discarded"), (True, "tab:green", "kept")):
        for rerun in (False, True):
            pts = [(x, r["val_bpb"]) for x, r in zip(xs, rows) if r["status"] != "crash"
                   and r["rerun"] == rerun and (r["commit"] in kept) == is_kept and r["val_bpb"] <= top]
            if pts:
                ax.scatter(*zip(*pts), s=40 if is_kept else 22, zorder=3 if is_kept else 2,
                           facecolors="none" if rerun else color, edgecolors=color,
                           label=f"{name} (rerun)" if rerun else name)
    off_scale = [x for x, r in zip(xs, rows) if r["status"] != "crash" and r["val_bpb"] > top]
    crashes = [x for x, r in zip(xs, rows) if r["status"] == "crash"]
    for marks, y, style, color, name in ((off_scale, 0.98, "^", "0.6", f"worse than {top:.3f}"),
                                          (crashes, 0.02, "x", "tab:red", "crash")):
        if marks:  # x in data, y in axes units: outside the value range
            ax.plot(marks, [y] * len(marks), style, color=color, ms=6, clip_on=False,
                    transform=ax.get_xaxis_transform(), label=name)

    best_x, best_y = [], []
    steps = [(0, summary["baseline"]["val_bpb"])] + [(k["index"], k["val_bpb"]) for k in summary["kept_changes"]]
    for x, y in steps:
        if y is not None and (not best_y or y < best_y[-1]):
            best_x.append(x)
            best_y.append(y)
    if best_y:
        ax.step(best_x + [max(xs)], best_y + best_y[-1:], where="post", color="tab:green",
                lw=1.5, alpha=0.7, label="running best")
    # Kept labels hang straight down below the staircase (empty there); a label too close to
    # the previous one moves right, with a leader line, so that none overlap.
    min_gap = 13 * (max(xs) + 1) / (0.85 * fig.get_figwidth() * fig.dpi)  # ~13 px in data units
    label_x, lowest = -math.inf, {}
    for r in rows:
        if r["status"] != "crash":
            lowest[r["commit"]] = min(r["val_bpb"], lowest.get(r["commit"], math.inf))
    by_gain = sorted(summary["kept_changes"], key=lambda k: -math.inf if k["gain"] is None else -k["gain"])
    for k in sorted(by_gain[:MAX_LABELS], key=lambda k: k["index"]):
        d = k["description"]
        label_x = max(k["index"], label_x + min_gap)
        ax.annotate(d if len(d) <= LABEL_CHARS else d[:LABEL_CHARS - 1] + "…",
                    (k["index"], k["val_bpb"]), xytext=(label_x, lowest[k["commit"]] - 0.03 * (top - bottom)),
                    fontsize=7, color="darkgreen", rotation=-90, rotation_mode="anchor",
                    ha="left", va="center", arrowprops=dict(arrowstyle="-", color="darkgreen", lw=0.5))

    ax.set_ylim(bottom, top)
    ax.set_xlim(-0.5, max(xs + [5]) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)
    n, best, imp = summary["experiments"], summary["best"]["val_bpb"], summary["improvement"]
    title = f"autoresearch: {n} experiment{'s' * (n != 1)}, {summary['kept']} kept"
    if best is not None:
        title += f", best val_bpb {best:.6f}"
    if imp:
        title += f" ({0.0 - imp['percent']:+.2f}% vs baseline)"
    fig.suptitle(title)
    ax.set_xlabel("experiment # (reruns share their experiment's #)")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(alpha=0.25)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=7, fontsize=8, frameon=False)
    fig.tight_layout()

    png_path = Path(png_path)
    fd, tmp = tempfile.mkstemp(dir=png_path.parent, prefix=f".{png_path.stem}-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, png_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return png_path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Summarize results.tsv and plot progress.png.")
    parser.add_argument("results", nargs="?", default="results.tsv", help="default: ./results.tsv")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--png", help="where to write the plot (default: progress.png next to results.tsv)")
    parser.add_argument("--no-png", action="store_true", help="do not write the plot")
    args = parser.parse_args(argv)
    try:
        rows = parse_results(args.results)
        summary = summarize(rows)
        png = None
        if not args.no_png:
            png = Path(args.png) if args.png else Path(args.results).with_name("progress.png")
            try:
                plot_progress(rows, summary, png)
            except OSError as e:
                raise ResultsError(f"{png}: cannot write the plot ({e.strerror}); "
                                   "pass a writable path with --png or use --no-png") from None
    except ResultsError as e:
        print(f"analysis.py: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dict(summary, png=str(png) if png else None), ensure_ascii=False))
    else:
        print(render_text(summary, args.results))
        if png:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `uv run analysis.py | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
