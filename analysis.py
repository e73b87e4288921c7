"""
The morning report: read results.tsv, print the run at a glance, draw progress.png.

    uv run analysis.py [results.tsv] [--json] [--png progress.png | --no-png]
    uv run analysis.py --check run.log     # program.md's guard: does the harness's record back this run?

results.tsv is written by hand all night, so it is read leniently: columns by header name (commit,
val_bpb and status required), any line endings, a BOM, status synonyms (kept, reverted, failed, ...).
A line that cannot be read is skipped with one warning on stderr that names it; the rest is reported.
A status of another name is a row of its own kind, "other", counted and named once.

Noise rules (program.md): a row whose description says "(noise)" is a rerun; every other row (and
every crash) is an experiment, the first one the baseline. A rerun belongs to an experiment of the
same commit, before or after it. An experiment's value is the mean of its runs. The best is the last
kept experiment (program.md's ratchet: B is always its value). M = max - min of the baseline's runs.
Kept gains smaller than M are marked "≈noise".

The harness writes its own record of every evaluation (evaluations.jsonl, beside results.tsv): each row
is checked against it (backed, or why not), and its test_bpb, scored on data nobody tuned on, says how
much of the night's gain holds there.
"""

import argparse
import json
import subprocess
import math
import os
import re
import secrets
import signal
import sys
from pathlib import Path

from harness import evaluations
from harness.formats import RESULTS_HEADER, parse_summary

HEADER = list(RESULTS_HEADER)
REQUIRED = ("commit", "val_bpb", "status")
STATUSES = ("keep", "discard", "crash", "other")
SYNONYMS = {  # what people and agents write in the status column
    "keep": ("keep", "kept", "best", "baseline", "improved", "accept", "accepted"),
    "discard": ("discard", "discarded", "revert", "reverted", "reject", "rejected", "worse"),
    "crash": ("crash", "crashed", "fail", "failed", "failure", "error", "timeout", "oom"),
}
STATUS_OF = {word: status for status, words in SYNONYMS.items() for word in words}
MAX_WARNINGS = 10  # skipped lines named one by one on stderr; the rest in one line
LABEL_CHARS = 28  # kept descriptions are cut to this length on the plot
MAX_LABELS = 20  # on a long night only the kept changes with the largest gains get a label


class ResultsError(Exception):
    """A results.tsv that cannot be read; the message is the one line to print."""


def clean(text):
    """Text that is safe to print, to store in JSON and to draw: every character that is not printable
    (terminal escape codes, bidi overrides, line separators) becomes a visible escape such as \\x1b."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def parse_results(path, warnings=None):
    """Read results.tsv into a list of row dicts (val_bpb None where there is no value).

    A line that cannot be read is skipped, and (its number, one line saying why) is appended to
    `warnings`; other oddities are appended as (None, the line).
    ResultsError only when there is nothing to report: no file, no header, no readable row."""
    path, header = Path(path), "\\t".join(HEADER)
    warnings = [] if warnings is None else warnings
    name = clean(str(path))
    if not path.is_file():
        raise ResultsError(f"{name}: no such file; pass the path to results.tsv "
                           "(uv run analysis.py path/to/results.tsv)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ResultsError(f"{name}: cannot read it ({e.strerror}); check the file") from None
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text and b"\xef\xbf\xbd" not in data:
        warnings.append((None, f"{name}: not valid UTF-8; the bytes that are not are shown as \ufffd"))
    lines = [line.removeprefix("\ufeff") for line in re.split(r"\r\n|\r|\n", text)]  # BOM, any line ending
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise ResultsError(f"{name} line 1: file is empty; write the header '{header}' first")
    (header_no, header_line), body = numbered[0], numbered[1:]
    columns = [c.strip().lower() for c in header_line.split("\t")]
    if not set(REQUIRED) <= set(columns):
        if len(columns) != len(HEADER) or set(HEADER) & set(columns):
            missing = ", ".join(c for c in REQUIRED if c not in columns)
            raise ResultsError(f"{name} line {header_no}: the header {clean(header_line)!r} has no column "
                               f"{missing}; the first line must name the tab-separated columns, e.g. '{header}'")
        warnings.append((None, f"{name} line {header_no}: no header; reading the columns as {', '.join(HEADER)}"))
        columns, body = HEADER, numbered
    where = {c: columns.index(c) for c in HEADER if c in columns}  # the first column of each name
    rows = []
    for lineno, line in body:
        fields = line.split("\t")
        while len(fields) > len(columns) and not fields[-1].strip():  # trailing tabs carry nothing
            fields.pop()
        why = _unreadable(line, fields, columns)
        status = STATUS_OF.get(fields[where["status"]].strip().lower(), "other") if why is None else None
        if status == "other" and not fields[where["status"]].strip():
            why = "no status; write keep, discard or crash"
        if why is not None:
            warnings.append((lineno, f"{name} line {lineno}: skipped: {why}"))
            continue
        get = lambda column: fields[where[column]].strip() if column in where else ""
        rows.append(dict(line=lineno, commit=clean(get("commit")), status=status,
                         val_bpb=None if status == "crash" else _value(get("val_bpb")),
                         memory_gb=_number(get("memory_gb")), description=clean(get("description")),
                         status_written=clean(get("status"))))
    for other in sorted({row["status_written"] for row in rows if row["status"] == "other"}):
        lines = [str(row["line"]) for row in rows if row["status_written"] == other]
        warnings.append((None, f"{name}: status {other!r} (line{'s' * (len(lines) > 1)} {', '.join(lines)}) is not "
                               f"keep, discard or crash: counted as other"))
    if not body:
        raise ResultsError(f"{name}: no experiments yet (only the header); run the baseline and log it first")
    if not rows:
        raise ResultsError(f"{name}: none of the {len(body)} line{'s' * (len(body) != 1)} after the header "
                           "could be read (see the warnings above); fix them or log the baseline")
    return rows


def _unreadable(line, fields, columns):
    """Why a line after the header cannot be read as a row, or None."""
    text = line.strip()
    if text.startswith("#"):
        return "a comment"
    if set(text) <= set("-=_|+:* \t"):
        return "a separator line"
    if [f.strip().lower() for f in fields] == list(columns):
        return "the header again"
    if len(fields) != len(columns):
        return (f"{len(fields)} tab-separated fields, expected {len(columns)} "
                f"({', '.join(columns)})")
    if not fields[columns.index("commit")].strip():
        return "no commit"
    return None


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None


def _value(text):
    """A val_bpb, or None for no value: empty, N/A, FAILED, and zero, negative or non-finite numbers."""
    x = _number(text)
    return x if x is not None and math.isfinite(x) and x > 0 else None


def mark_reruns(rows):
    """Set row["rerun"] (its description says "(noise)"; a crash never is one), row["of"] (the index of
    the experiment row a rerun belongs to, None if its commit has none) and row["x"], the index of the
    row's experiment (baseline 0). A rerun belongs to an experiment row of the same commit, logged before
    or after it: the one whose description it starts with, else the nearest."""
    for row in rows:
        row["rerun"] = row["status"] != "crash" and "(noise)" in row["description"].lower()
    if rows and all(row["rerun"] for row in rows):  # reruns of nothing: the first row is the baseline
        rows[0]["rerun"] = False
    experiments = [i for i, row in enumerate(rows) if not row["rerun"]]
    for x, i in enumerate(experiments):
        rows[i].update(x=x, of=i)
    for i, row in enumerate(rows):
        if row["rerun"]:
            def rank(j):
                d = rows[j]["description"]
                return len(d) if d and row["description"].startswith(d) else 0, -abs(j - i)
            row["of"] = max((j for j in experiments if rows[j]["commit"] == row["commit"]), key=rank, default=None)
            row["x"] = rows[row["of"]]["x"] if row["of"] is not None else \
                max((rows[j]["x"] for j in experiments if j < i), default=0)
    return rows


def summarize(rows, records=None):
    """The report as a plain dict (the --json object): counts, baseline, best, noise, kept changes; with the
    harness's records (evaluations.jsonl), which rows they back and the test split's view of the night."""
    values = {}  # experiment row index -> the val_bpb of its runs (its own and its reruns')
    for row in mark_reruns(rows):
        if row["of"] is not None and row["val_bpb"] is not None:
            values.setdefault(row["of"], []).append(row["val_bpb"])
    mean = lambda i: sum(values[i]) / len(values[i]) if i in values else None
    (base_i, base_row), *experiments = [(i, row) for i, row in enumerate(rows) if not row["rerun"]]
    counts = {s: sum(row["status"] == s for _, row in experiments) for s in STATUSES}
    base_values = values.get(base_i, [])
    margin = max(base_values) - min(base_values) if len(base_values) >= 2 else None
    backed = check_rows(rows, records)
    tests = {}  # experiment row index -> the test_bpb of its backed runs
    for row in rows:
        if row["of"] is not None and row.get("test_bpb") is not None:
            tests.setdefault(row["of"], []).append(row["test_bpb"])
    test_mean = lambda i: sum(tests[i]) / len(tests[i]) if i in tests else None

    # The best is the last kept experiment: program.md's B, the -best tag and notes.md name the same commit
    best_i, best_value, kept_changes = base_i, mean(base_i), []
    for i, row in experiments:
        if row["status"] != "keep" or mean(i) is None:
            continue
        gain = None if best_value is None else best_value - mean(i)
        test_gain = None if test_mean(best_i) is None or test_mean(i) is None else test_mean(best_i) - test_mean(i)
        kept_changes.append(dict(
            index=row["x"], commit=row["commit"], val_bpb=_r(mean(i)), runs=len(values[i]),
            description=row["description"], gain=_r(gain), test_bpb=_r(test_mean(i)), test_gain=_r(test_gain),
            within_noise=gain is not None and margin is not None and abs(_r(gain)) < _r(margin),
            verified=None if records is None else any(
                r.get("verified") and (r.get("commit") or "").startswith(row["commit"])
                and f"{r.get('printed', -1):.6f}" == f"{row['val_bpb']:.6f}" for r in records),
            # a gain on the validation rows that the test split does not show: tuned to the rows, not a better model
            unseen_gap=test_gain is not None and gain is not None and margin is not None and gain >= margin
            and test_gain < gain / 2))
        best_i, best_value = i, mean(i)

    improvement = unseen = None
    if mean(base_i) is not None:
        absolute = mean(base_i) - best_value
        improvement = dict(absolute=_r(absolute), percent=round(100 * absolute / mean(base_i), 4),
                           multiple_of_margin=round(absolute / margin, 2) if margin else None)
        if test_mean(base_i) is not None and test_mean(best_i) is not None:
            test_gain = test_mean(base_i) - test_mean(best_i)
            unseen = dict(baseline=_r(test_mean(base_i)), best=_r(test_mean(best_i)), gain=_r(test_gain),
                          share_of_val_gain=round(test_gain / absolute, 4) if absolute > 0 else None)
    best_row = rows[best_i]
    return dict(
        experiments=len(experiments), reruns=sum(row["rerun"] for row in rows),
        kept=counts["keep"], discarded=counts["discard"], crashed=counts["crash"], other=counts["other"],
        other_statuses=sorted({row["status_written"] for _, row in experiments if row["status"] == "other"}),
        keep_rate=round(counts["keep"] / len(experiments), 4) if experiments else None,
        baseline=dict(commit=base_row["commit"], val_bpb=_r(mean(base_i)), description=base_row["description"],
                      test_bpb=_r(test_mean(base_i))),
        best=dict(commit=best_row["commit"], val_bpb=_r(best_value), description=best_row["description"],
                  test_bpb=_r(test_mean(best_i))),
        improvement=improvement, unseen=unseen,
        noise=dict(runs=len(base_values), margin=_r(margin), baseline_mean=_r(mean(base_i))),
        kept_changes=kept_changes, **backed,
    )


def check_rows(rows, records):
    """Each row with a val_bpb against the harness's records: {records, backed, not_backed}; a backed row gets
    its record's test_bpb. records None: no evaluations.jsonl, the rows are as typed."""
    scored = [row for row in rows if row["val_bpb"] is not None]
    if records is None:
        return dict(records=False, rows_with_value=len(scored), backed=None, not_backed=[])
    not_backed = []
    for row in scored:
        record, why = evaluations.backing(row["commit"], row["val_bpb"], records)
        if record is None:
            not_backed.append(dict(line=row["line"], commit=row["commit"], val_bpb=row["val_bpb"], why=why))
        else:
            row["test_bpb"] = record.get("test_bpb")
    return dict(records=True, rows_with_value=len(scored), backed=len(scored) - len(not_backed),
                not_backed=not_backed)


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
    if s["records"]:
        out = [f"{s['backed']} of {s['rows_with_value']} rows backed by the harness (evaluations.jsonl)"]
        out += [f"  not backed: line {r['line']} {r['commit']} {r['val_bpb']:.6f}: {r['why']}" for r in s["not_backed"]]
    else:
        out = ["records absent: no evaluations.jsonl beside this file, so its rows are as typed, unchecked"]
    other = f", other {s['other']} ({', '.join(s['other_statuses'])})" if s["other"] else ""
    out += [f"{path}: {n} experiment{'s' * (n != 1)} after the baseline ({s['reruns']} reruns not counted)",
            f"  kept {s['kept']}, discarded {s['discarded']}, crashed {s['crashed']}{other}, keep rate {rate}",
            f"baseline     {s['baseline']['commit']}  {base_value}",
            f"best         {s['best']['commit']}  {best_value}  {s['best']['description']}  (the last kept)"]
    if imp:
        times = f" = {imp['multiple_of_margin']:.1f} × M" if imp["multiple_of_margin"] is not None else ""
        out.append(f"improvement  {imp['absolute']:.6f} ({imp['percent']:.2f}%){times}")
    if s["unseen"]:
        u = s["unseen"]
        share = "" if u["share_of_val_gain"] is None else f": {100 * u['share_of_val_gain']:.0f}% of the val gain holds"
        out.append(f"test split   baseline {u['baseline']:.6f}, best {u['best']:.6f}, gain {u['gain']:.6f}{share} "
                   f"(data nobody tuned on)")
    if noise["margin"] is None:
        out.append(f"noise        M not measured ({runs} baseline run{'s' * (runs != 1)}): rerun the "
                   "unchanged baseline with SEED=1 and SEED=2, same commit, described '(noise)'")
    else:
        out.append(f"noise        M = {noise['margin']:.6f} (max - min of {runs} baseline runs)")
    out.append("kept changes (gain over the kept commit before; test_bpb beside):" if s["kept_changes"]
               else "no kept changes yet")
    for k in s["kept_changes"]:
        gain = "      n/a" if k["gain"] is None else f"{k['gain']:+.6f}"
        mark = "≈noise" if k["within_noise"] else ""
        test = "" if k["test_bpb"] is None else f"  test {k['test_bpb']:.6f}"
        test += {True: "  verified", False: "  NOT VERIFIED", None: ""}[k["verified"]]
        test += "  (val gain not matched on test)" if k["unseen_gap"] else ""
        reruns = f"  (mean of {k['runs']} runs)" if k["runs"] > 1 else ""
        out.append(f"  #{k['index']:<3} {k['commit']}  {k['val_bpb']:.6f}  {gain}  {mark:6}{test}  "
                   f"{k['description']}{reruns}")
    return "\n".join(out)


def make_figure(rows, summary):
    """The progress plot as a matplotlib Figure: val_bpb against the experiment index."""
    # Imported here: matplotlib takes seconds to load, and errors or --no-png need none of it.
    # A bare Figure on an Agg canvas: no display, no pyplot state, the caller's backend untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    xs = [r["x"] for r in mark_reruns(rows)]
    runs = [(x, r) for x, r in zip(xs, rows) if r["val_bpb"] is not None]
    values = [r["val_bpb"] for _, r in runs]
    base_i = next(i for i, r in enumerate(rows) if not r["rerun"])
    base_vals = [r["val_bpb"] for _, r in runs if r["of"] == base_i]
    fig = Figure(figsize=(12, 6.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if values:  # zoom on baseline..best: far-worse discards would squash the plot, so they sit on the top edge
        low, base_hi = min(values), max(base_vals or values)
        span = max(base_hi - low, 1e-3)
        top = max(min(max(values), base_hi + 0.5 * span), low + 0.5 * span) + 0.05 * span
        bottom = low - 0.75 * span  # room for the labels below the staircase
    else:  # every run crashed: no value axis to show
        bottom, top = 0.0, 1.0
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no run has a val_bpb yet: every run crashed", transform=ax.transAxes,
                ha="center", va="center", color="tab:red")
    noise = summary["noise"]
    if noise["margin"] is not None:
        ax.axhspan(min(base_vals), max(base_vals), color="0.5", alpha=0.2, lw=0,
                   label=f"baseline noise, {noise['runs']} seeds, M = {noise['margin']:.4f}")
    # Each run at its own val_bpb: experiments filled (green if kept), reruns hollow whatever became of them
    for kind, color, size, label in (("discard", "0.6", 22, "discarded"), ("keep", "tab:green", 40, "kept"),
                                     ("rerun", "tab:blue", 30, "rerun (noise)")):
        pts = [(x, r["val_bpb"]) for x, r in runs if r["val_bpb"] <= top
               and ("rerun" if r["rerun"] else r["status"]) == kind]
        if pts:
            ax.scatter(*zip(*pts), s=size, zorder=3 if kind == "keep" else 2, label=label, edgecolors=color,
                       facecolors="none" if kind == "rerun" else color)
    off_scale = [x for x, r in runs if r["val_bpb"] > top]
    crashes = [x for x, r in zip(xs, rows) if r["status"] == "crash"]
    # Both on the top edge (worse), never near the best at the bottom; y in axes units, outside the values
    for marks, y, style, color, name in ((off_scale, 0.97, "^", "0.6", f"worse than {top:.3f}"),
                                          (crashes, 1.0, "x", "tab:red", "crash (no val_bpb)")):
        if marks:
            ax.plot(marks, [y] * len(marks), style, color=color, ms=7, mew=2 if style == "x" else 1,
                    clip_on=False, transform=ax.get_xaxis_transform(), label=name)

    steps = [(0, summary["baseline"]["val_bpb"])] + [(k["index"], k["val_bpb"]) for k in summary["kept_changes"]]
    best_x, best_y = zip(*[(x, y) for x, y in steps if y is not None]) if steps[0][1] is not None else ((), ())
    if best_y:
        ax.step([*best_x, max(xs)], [*best_y, best_y[-1]], where="post", color="tab:green",
                lw=1.5, alpha=0.7, label="the kept commit (mean of its runs)")
    tests = [(0, summary["baseline"]["test_bpb"])] + [(k["index"], k["test_bpb"]) for k in summary["kept_changes"]]
    tests = [(x, y) for x, y in tests if y is not None]
    if tests:   # the kept runs on the test split: how much of the staircase holds on data nobody tuned on
        twin = ax.twinx()
        twin.step([x for x, _ in tests] + [max(xs)], [y for _, y in tests] + [tests[-1][1]], where="post",
                  color="tab:purple", lw=1.5, ls="--", label="the kept commit on the test split (right axis)")
        twin.set_ylabel("test_bpb of the kept commits", color="tab:purple")
        twin.legend(loc="upper right", fontsize=8, frameon=False)
    # Kept labels hang straight down below the staircase (empty there); a label too close to
    # the previous one moves right, with a leader line, so that none overlap.
    min_gap = 13 * (max(xs) + 1) / (0.85 * fig.get_figwidth() * fig.dpi)  # ~13 px in data units
    label_x, lowest = -math.inf, {}
    for x, r in runs:
        lowest[x] = min(r["val_bpb"], lowest.get(x, math.inf))
    by_gain = sorted(summary["kept_changes"], key=lambda k: -math.inf if k["gain"] is None else -k["gain"])
    for k in sorted(by_gain[:MAX_LABELS], key=lambda k: k["index"]):
        d = k["description"]
        label_x = max(k["index"], label_x + min_gap)
        # parse_math and usetex off: a description is plain text, even with $...$ or backslashes in it
        ax.annotate(d if len(d) <= LABEL_CHARS else d[:LABEL_CHARS - 1] + "…",
                    (k["index"], k["val_bpb"]), xytext=(label_x, lowest[k["index"]] - 0.03 * (top - bottom)),
                    fontsize=7, color="darkgreen", rotation=-90, rotation_mode="anchor", ha="left",
                    va="center", parse_math=False, usetex=False,
                    arrowprops=dict(arrowstyle="-", color="darkgreen", lw=0.5))

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
    return fig


def plot_progress(rows, summary, png_path):
    """Draw the progress plot to png_path, atomically, readable by others as a new file would be."""
    fig = make_figure(rows, summary)
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.stem}-{secrets.token_hex(4)}.png")
    # os.open with 0o666 lets the umask decide the mode (0644 usually); mkstemp would make it 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, png_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return png_path


def check_run(log_path, records_path):
    """The keep guard: 0 and one line if a record of HEAD backs the val_bpb that the run's log prints; else 1 and
    one line saying what does not hold."""
    try:
        val_bpb = parse_summary(Path(log_path).read_text(errors="replace")).get("val_bpb")
    except OSError as e:
        val_bpb, why = None, f"cannot read {log_path} ({e.strerror})"
    else:
        why = f"{log_path} has no `val_bpb:` line: the run crashed"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    records, _ = evaluations.read(records_path)
    if val_bpb is not None and _value(val_bpb) is not None:
        if records is None:
            why = f"no {records_path}: the harness wrote no record of this run; do not keep it"
        else:
            record, why = evaluations.backing(head, float(val_bpb), records)
            if record is not None:
                print(f"backed: the harness measured val_bpb {val_bpb} for {head[:7]} ({record['time']})")
                return 0
            why = f"val_bpb {val_bpb} of {head[:7]} is not backed: {why}; do not keep it"
    print(f"analysis.py --check: {why}", file=sys.stderr)
    return 1


def main(argv=None):
    parser = argparse.ArgumentParser(description="Summarize results.tsv and plot progress.png.")
    parser.add_argument("results", nargs="?", default="results.tsv", help="default: ./results.tsv")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--png", help="where to write the plot (default: progress.png next to results.tsv)")
    parser.add_argument("--no-png", action="store_true", help="do not write the plot")
    parser.add_argument("--check", metavar="RUN_LOG", help="instead: does the harness's record back the val_bpb of "
                        "this run's log, for HEAD, from a clean tree and the frozen constants? (program.md's guard)")
    args = parser.parse_args(argv)
    if args.check:
        return check_run(args.check, Path(args.results).with_name(evaluations.RECORDS_FILE))
    warnings = []
    try:
        try:
            rows = parse_results(args.results, warnings)
        finally:  # the skipped lines are named even when nothing else could be read
            for _, warning in warnings[:MAX_WARNINGS]:
                print(f"analysis.py: {warning}", file=sys.stderr)
            if len(warnings) > MAX_WARNINGS:
                print(f"analysis.py: {len(warnings) - MAX_WARNINGS} more lines skipped or odd, "
                      "not shown one by one", file=sys.stderr)
        records, bad = evaluations.read(Path(args.results).with_name(evaluations.RECORDS_FILE))
        if bad:
            warnings.append((None, f"{evaluations.RECORDS_FILE}: {bad} line{'s' * (bad != 1)} that are no record"))
        summary = summarize(rows, records)
        png = None
        if not args.no_png:
            png = Path(args.png) if args.png else Path(args.results).with_name("progress.png")
            try:
                plot_progress(rows, summary, png)
            except OSError as e:
                raise ResultsError(f"{clean(str(png))}: cannot write the plot ({e.strerror}); "
                                   "pass a writable path with --png or use --no-png") from None
    except ResultsError as e:
        print(f"analysis.py: {e}", file=sys.stderr)
        return 1
    skipped = [line for line, _ in warnings if line is not None]
    if args.json:
        print(json.dumps(dict(summary, skipped_lines=skipped, png=str(png) if png else None), ensure_ascii=False))
    else:
        print(render_text(summary, clean(args.results)))
        if skipped:
            print(f"skipped {len(skipped)} line{'s' * (len(skipped) != 1)} that could not be read "
                  f"(lines {', '.join(map(str, skipped))}: see the warnings)")
        if png:
            print(f"wrote {clean(str(png))}")
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `uv run analysis.py | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
