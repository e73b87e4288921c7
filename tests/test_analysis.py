"""Known answers for the morning report (analysis.py), computed by hand from a small results.tsv."""

import json
import os
import stat
import subprocess
import sys
import unicodedata
from pathlib import Path

import matplotlib.image
import pytest
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import analysis  # noqa: E402
from harness.formats import RESULTS_HEADER  # noqa: E402

HEADER = "\t".join(RESULTS_HEADER) + "\n"
# baseline + 2 noise reruns (M = 0.998300 - 0.997100 = 0.0012), a keep, a discard, a crash,
# and a keep confirmed by a rerun of the same commit (mean 0.994400, gain 0.000600 < M: noise)
ROWS = """\
a1b2c3d	0.997900	44.0	keep	baseline
a1b2c3d	0.998300	44.0	discard	baseline rerun, seed 1 (noise)
a1b2c3d	0.997100	44.0	discard	baseline rerun, seed 2 (noise)
b2c3d4e	0.995000	44.2	keep	warmdown 0.5→0.7
c3d4e5f	0.996000	44.1	discard	depth 9
d4e5f6a	0.000000	0.0	crash	double width (OOM)
e5f6a7b	0.994200	44.3	keep	lower matrix lr
e5f6a7b	0.994600	44.3	discard	lower matrix lr rerun, seed 1 (noise)
"""
BASELINE = (0.997900 + 0.998300 + 0.997100) / 3  # 0.997767


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "analysis.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text(HEADER + ROWS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """`analysis.py results.tsv --json` as a user runs it (umask 022), once for the three tests that read it."""
    results = tmp_path_factory.mktemp("report") / "results.tsv"
    results.write_text(HEADER + ROWS, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "analysis.py"), str(results), "--json"], capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    return results, proc


def test_json_known_answers(report):
    results, proc = report
    s = json.loads(proc.stdout)
    assert (s["experiments"], s["kept"], s["discarded"], s["crashed"]) == (4, 2, 1, 1)
    assert s["reruns"] == 3
    assert s["keep_rate"] == 0.5
    assert s["baseline"] == {"commit": "a1b2c3d", "val_bpb": pytest.approx(BASELINE, abs=1e-6),
                             "description": "baseline", "test_bpb": None}   # no records: no test split
    assert s["best"] == {"commit": "e5f6a7b", "val_bpb": pytest.approx(0.9944, abs=1e-9),
                         "description": "lower matrix lr", "test_bpb": None}
    assert s["noise"] == {"runs": 3, "margin": pytest.approx(0.0012, abs=1e-9),
                          "baseline_mean": pytest.approx(BASELINE, abs=1e-6)}
    assert s["improvement"]["absolute"] == pytest.approx(BASELINE - 0.9944, abs=1e-6)
    assert s["improvement"]["percent"] == pytest.approx(100 * (BASELINE - 0.9944) / BASELINE, abs=1e-4)
    assert s["improvement"]["multiple_of_margin"] == pytest.approx(2.81, abs=0.01)
    kept = [(k["index"], k["commit"], k["runs"], k["within_noise"]) for k in s["kept_changes"]]
    assert kept == [(1, "b2c3d4e", 1, False), (4, "e5f6a7b", 2, True)]
    assert s["kept_changes"][0]["gain"] == pytest.approx(BASELINE - 0.995, abs=1e-6)
    assert s["kept_changes"][1]["val_bpb"] == pytest.approx(0.9944, abs=1e-9)
    assert s["kept_changes"][1]["gain"] == pytest.approx(0.0006, abs=1e-9)
    assert Path(s["png"]) == results.with_name("progress.png")


def test_png_is_written_next_to_results(report):
    results = report[0]
    png = results.with_name("progress.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width >= 800 and height >= 400
    assert sorted(p.name for p in results.parent.iterdir()) == ["progress.png", "results.tsv"]  # no temp left


def test_png_flag_and_no_png(results, tmp_path, capsys):
    out = tmp_path / "plots" / "night.png"
    out.parent.mkdir()
    assert analysis.main([str(results), "--png", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert not results.with_name("progress.png").exists()
    assert analysis.main([str(results), "--json", "--no-png"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["png"] is None
    assert not results.with_name("progress.png").exists()


def test_unwritable_png_is_one_line(results, capsys):
    assert analysis.main([str(results), "--png", str(results.parent / "missing-dir" / "p.png")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot write the plot" in err


def test_text_report(results, capsys):
    assert analysis.main([str(results), "--no-png"]) == 0
    text = capsys.readouterr().out
    assert "4 experiments after the baseline (3 reruns not counted)" in text
    assert "kept 2, discarded 1, crashed 1, keep rate 50%" in text
    assert "0.997767" in text and "0.994400" in text
    assert "M = 0.001200" in text and "2.8 × M" in text
    noisy = [line for line in text.splitlines() if "≈noise" in line]
    assert len(noisy) == 1 and "e5f6a7b" in noisy[0] and "+0.000600" in noisy[0]


def test_default_path_is_results_tsv_in_cwd(results):
    proc = run("--no-png", cwd=results.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith("results.tsv: 4 experiments")


def test_single_baseline_has_no_margin(tmp_path):
    rows = analysis.parse_results(_write(tmp_path, HEADER + "abcdef0\t0.997900\t44.0\tkeep\tbaseline\n"
                                                  "1234567\t0.990000\t44.0\tkeep\tdepth 9\n"))
    s = analysis.summarize(rows)
    assert s["noise"] == {"runs": 1, "margin": None, "baseline_mean": 0.9979}
    assert s["improvement"]["multiple_of_margin"] is None
    assert s["kept_changes"][0]["within_noise"] is False
    assert "M not measured" in analysis.render_text(s)
    assert analysis.plot_progress(rows, s, tmp_path / "p.png").is_file()


def test_functions_agree_with_cli(results, capsys):
    rows = analysis.parse_results(results)
    s = analysis.summarize(rows)
    assert [r["rerun"] for r in rows] == [False, True, True, False, False, False, False, True]
    assert [r["x"] for r in rows] == [0, 0, 0, 1, 2, 3, 4, 4]
    assert analysis.main([str(results), "--json", "--no-png"]) == 0
    assert {k: v for k, v in json.loads(capsys.readouterr().out).items() if k not in ("png", "skipped_lines")} == s


def test_a_rerun_is_only_what_says_noise(tmp_path):
    """Another experiment under the same commit (an edit not committed, a crash) is an experiment,
    and a "(noise)" row whose commit has no experiment row counts as a rerun of nothing."""
    text = HEADER + ROWS + ("f6a7b8c\t0.994000\t44.3\tdiscard\tseed 137 (noise)\n"
                            "f6a7b8c\t0.994100\t44.3\tdiscard\twarmup 5%\n"
                            "f6a7b8c\t0.000000\t0.0\tcrash\tdepth 12 (noise)\n"
                            "0a1b2c3\t0.990000\t44.3\tdiscard\torphan rerun (noise)\n")
    rows = analysis.parse_results(_write(tmp_path, text))
    s = analysis.summarize(rows)
    assert (s["experiments"], s["reruns"], s["discarded"], s["crashed"]) == (6, 5, 2, 2)
    assert s["best"]["commit"] == "e5f6a7b"
    assert [r["x"] for r in rows[-4:]] == [5, 5, 6, 6]


def _write(tmp_path, text, name="results.tsv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BAD = {  # files with nothing to report: one line, exit 1
    "empty": ("", "line 1", "empty"),
    "no val_bpb column": ("commit\tbpb\tmemory_gb\tstatus\tdescription\n" + ROWS, "line 1", "no column val_bpb"),
    "only header": (HEADER, "", "no experiments yet"),
}


@pytest.mark.parametrize("case", BAD)
def test_nothing_to_report_fails_with_one_line(tmp_path, capsys, case):
    text, where, problem = BAD[case]
    path = _write(tmp_path, text)
    assert analysis.main([str(path), "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert str(path) in err and where in err and problem in err
    assert list(tmp_path.iterdir()) == [path]  # no png, no temp file


def test_a_bad_line_is_skipped_not_the_file(tmp_path):
    path = _write(tmp_path, HEADER + ROWS + "f6a7b8c\t0.990000\tkeep\tno memory column\n")
    proc = run(path, "--no-png")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (f"analysis.py: {path} line 10: skipped: 4 tab-separated fields, expected 5 "
                           "(commit, val_bpb, memory_gb, status, description)\n")
    assert "4 experiments after the baseline" in proc.stdout and "skipped 1 line that could not be read" in proc.stdout


# Every deviation that real results.tsv files show (lines numbered as the file has them).
# BOM; a reordered header with an extra column and no memory_gb; CRLF, LF, CR alone; blank lines; no final
# newline; separator, comment, repeated header and wrong field count (skipped); an unknown status (other); status
# synonyms in any case; N/A, FAILED, empty, zero, negative, inf, nan as val_bpb; labels as commits.
MESSY = [
    "\ufeffStatus\tcommit\tdescription\tval_bpb\tgpu\r\n",                                   # 1
    "baseline\ta1b2c3d\tbaseline\t0.998000\tH100\r\n",                                      # 2
    "\r\n",                                                                                # 3
    "discarded\ta1b2c3d\tbaseline rerun, seed 1 (noise)\t0.999000\tH100\n",                  # 4
    "---\n",                                                                               # 5 skipped
    "Kept\tb2c3d4e-dirty\twarmdown $\\frac{1}{2}$ C:\\tmp \x1b[2J\x07\x9b\u2028\x0c end\t0.996000\tH100\r",  # 6
    "# context compacted here\n",                                                          # 7 skipped
    "reverted\tc3d4e5f\tdepth 9\tN/A\tH100\n",                                              # 8
    "failed\td4e5f6a\tdouble width (OOM)\t\tH100\n",                                         # 9
    "crashed\texp-7\tdepth 12\tFAILED\n",                                                    # 10 skipped
    "error\texp-8\ttypo\tFAILED\tH100\n",                                                    # 11
    "pending\te5f6a7b\tstill running\t0.990000\tH100\n",                                     # 12 other
    "best\tf6a7b8c\tlr 0.05\t0.995000\tH100\r\n",                                            # 13
    "KEEP\t0a1b2c3\tzero value\t0.000000\tH100\n",                                            # 14
    "discard\t1b2c3d4\tnegative\t-1.5\tH100\n",                                               # 15
    "discard\t2c3d4e5\tinfinite\tinf\tH100\n",                                                # 16
    "discard\t3d4e5f6\tnot a number\tnan\tH100\n",                                            # 17
    "status\tcommit\tdescription\tval_bpb\tgpu\n",                                             # 18 skipped
    "discard\t4e5f6a7\tlast line, no newline\t0.997000\tH100",                                # 19
]
MESSY_SKIPPED = [5, 7, 10, 18]


def test_messy_results_tsv_is_read(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_bytes("".join(MESSY).encode("utf-8"))
    proc = run(path, "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert (s["experiments"], s["reruns"], s["kept"], s["discarded"], s["crashed"]) == (11, 1, 3, 5, 2)
    assert (s["other"], s["other_statuses"]) == (1, ["pending"])   # counted and shown, never dropped
    assert s["skipped_lines"] == MESSY_SKIPPED
    warnings = proc.stderr.splitlines()
    assert len(warnings) == len(MESSY_SKIPPED) + 1   # one per skipped line, each naming its line; one for `pending`
    for lineno, warning in zip(MESSY_SKIPPED, warnings):
        assert warning.startswith(f"analysis.py: {path} line {lineno}: skipped: ")
    assert warnings[-1] == f"analysis.py: {path}: status 'pending' (line 12) is not keep, discard or crash: " \
                           f"counted as other"
    assert s["baseline"] == {"commit": "a1b2c3d", "val_bpb": 0.9985, "description": "baseline", "test_bpb": None}
    assert s["noise"] == {"runs": 2, "margin": pytest.approx(0.001, abs=1e-9), "baseline_mean": 0.9985}
    assert s["best"] == {"commit": "f6a7b8c", "val_bpb": 0.995, "description": "lr 0.05",   # not 0, -1.5, inf
                         "test_bpb": None}
    assert [(k["index"], k["commit"]) for k in s["kept_changes"]] == [(1, "b2c3d4e-dirty"), (6, "f6a7b8c")]
    # the description arrives whole, its control characters as visible escapes
    assert s["kept_changes"][0]["description"] == r"warmdown $\frac{1}{2}$ C:\tmp \x1b[2J\x07\x9b\u2028\x0c end"
    assert matplotlib.image.imread(tmp_path / "progress.png").shape[1] >= 800


def test_descriptions_are_safe_to_print_and_draw(tmp_path):
    """$...$ (matplotlib mathtext), backslashes and terminal escape codes in a description."""
    nasty = "lr $\\eta_$ x2 \\ x\x1b]0;owned\x07\x1b[31m red \x9b2J $5 $ unbalanced"   # $\eta_$: bad mathtext
    path = _write(tmp_path, HEADER + ROWS.replace("warmdown 0.5→0.7", nasty))
    proc = run(path)
    assert proc.returncode == 0, proc.stderr
    assert not [c for c in proc.stdout if unicodedata.category(c) == "Cc" and c != "\n"]
    assert r"lr $\eta_$ x2 \ x\x1b]0;owned\x07\x1b[31m red \x9b2J $5 $ unbalanced" in proc.stdout
    assert (tmp_path / "progress.png").read_bytes()[:4] == b"\x89PNG"


def test_warnings_are_capped(tmp_path):
    path = _write(tmp_path, HEADER + ROWS + "---\n" * 30)
    proc = run(path, "--no-png")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == analysis.MAX_WARNINGS + 1 and "line 10: skipped: a separator line" in lines[0]
    assert lines[-1] == f"analysis.py: {30 - analysis.MAX_WARNINGS} more lines skipped or odd, not shown one by one"


# The example: the rerun of c3d4e5f is logged before its keep row.
RERUN_FIRST = """\
a1b2c3d	0.997900	44.0	keep	baseline
a1b2c3d	0.998300	44.0	discard	baseline rerun, seed 1 (noise)
a1b2c3d	0.997100	44.0	discard	baseline rerun, seed 2 (noise)
b2c3d4e	0.996100	44.2	keep	warmdown 0.5→0.7
c3d4e5f	0.995500	44.2	discard	lower matrix lr rerun (noise)
c3d4e5f	0.995700	44.2	keep	lower matrix lr
"""


def labelled(ax, label):
    return next(c.get_offsets().tolist() for c in ax.collections if c.get_label() == label)


def drawn(path, monkeypatch):
    """The axes that plot_progress draws for a results.tsv, caught as the figure is saved."""
    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    rows = analysis.parse_results(path)
    analysis.plot_progress(rows, analysis.summarize(rows), path.with_name("p.png"))
    return figures[0].axes[0]


def test_rerun_logged_before_its_keep(tmp_path, monkeypatch):
    path = _write(tmp_path, HEADER + RERUN_FIRST)
    proc = run(path, "--json", "--no-png")
    s = json.loads(proc.stdout)
    assert (s["experiments"], s["reruns"], s["kept"]) == (2, 3, 2)
    assert s["best"] == {"commit": "c3d4e5f", "val_bpb": 0.9956, "description": "lower matrix lr", "test_bpb": None}
    assert [(k["commit"], k["runs"]) for k in s["kept_changes"]] == [("b2c3d4e", 1), ("c3d4e5f", 2)]
    ax = drawn(path, monkeypatch)
    assert labelled(ax, "kept") == [[0, 0.9979], [1, 0.9961], [2, 0.9957]]
    assert labelled(ax, "rerun (noise)") == [[0, 0.9983], [0, 0.9971], [2, 0.9955]]
    assert "lower matrix lr" in [t.get_text() for t in ax.texts]


def test_plot_puts_crashes_on_the_top_edge(results, monkeypatch):
    """Crash markers sit on the top edge (worse), never down by the best run; off-scale runs just below."""
    ax = drawn(results, monkeypatch)
    crash = next(line for line in ax.lines if line.get_label().startswith("crash"))
    assert crash.get_xdata().tolist() == [3] and crash.get_ydata().tolist() == [1.0]   # axes fraction: the top
    assert crash.get_transform() == ax.get_xaxis_transform()
    assert ax.get_ylim()[0] < 0.9942 < ax.get_ylim()[1]   # the best run, down at the bottom


def test_plot_axis_with_only_a_baseline(tmp_path, monkeypatch):
    ax = drawn(_write(tmp_path, HEADER + "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"), monkeypatch)
    bottom, top = ax.get_ylim()
    assert 0.2 < (0.9979 - bottom) / (top - bottom) < 0.8   # inside the axis, not on its edge


def test_plot_axis_with_only_crashes(tmp_path, monkeypatch):
    text = HEADER + "a1b2c3d\t0.000000\t0.0\tcrash\tbaseline\nb2c3d4e\t0.000000\t0.0\tcrash\ttypo\n"
    summary = analysis.summarize(analysis.parse_results(_write(tmp_path, text)))
    assert (summary["crashed"], summary["best"]["val_bpb"], summary["baseline"]["val_bpb"]) == (1, None, None)
    ax = drawn(tmp_path / "results.tsv", monkeypatch)
    assert list(ax.get_yticks()) == []   # no made-up value scale
    assert any("every run crashed" in t.get_text() for t in ax.texts)
    assert analysis.main([str(tmp_path / "results.tsv")]) == 0


def test_png_is_readable_by_others(report):
    assert stat.S_IMODE(report[0].with_name("progress.png").stat().st_mode) == 0o644


def test_missing_file(tmp_path):
    proc = run(tmp_path / "nope.tsv")
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "nope.tsv" in proc.stderr
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
