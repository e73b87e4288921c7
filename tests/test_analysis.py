"""Known answers for the morning report (analysis.py), computed by hand from a small results.tsv."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import analysis  # noqa: E402

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
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


def test_json_known_answers(results):
    proc = run(results, "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert (s["experiments"], s["kept"], s["discarded"], s["crashed"]) == (4, 2, 1, 1)
    assert s["reruns"] == 3
    assert s["keep_rate"] == 0.5
    assert s["baseline"] == {"commit": "a1b2c3d", "val_bpb": pytest.approx(BASELINE, abs=1e-6),
                             "description": "baseline"}
    assert s["best"] == {"commit": "e5f6a7b", "val_bpb": pytest.approx(0.9944, abs=1e-9),
                         "description": "lower matrix lr"}
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


def test_png_is_written_next_to_results(results):
    proc = run(results, "--json")
    assert proc.returncode == 0, proc.stderr
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
    assert proc.stdout.startswith("results.tsv: 4 experiments")


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
    assert {k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "png"} == s


def test_noise_marked_rerun_of_a_new_commit_is_not_an_experiment(tmp_path):
    text = HEADER + ROWS + "f6a7b8c\t0.994000\t44.3\tdiscard\tseed 137 (noise)\n" \
        + "f6a7b8c\t0.994100\t44.3\tdiscard\tseed 137 again\n"
    rows = analysis.parse_results(_write(tmp_path, text))
    s = analysis.summarize(rows)
    assert (s["experiments"], s["reruns"], s["best"]["commit"]) == (4, 5, "e5f6a7b")
    assert [r["x"] for r in rows[-2:]] == [4, 4]


def _write(tmp_path, text, name="results.tsv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BAD = {
    "empty": ("", "line 1", "empty"),
    "wrong header": ("commit\tval_bpb\tstatus\n" + ROWS, "line 1", "header"),
    "columns": (HEADER + ROWS + "f6a7b8c\t0.990000\tkeep\tno memory column\n", "line 10", "columns"),
    "not a number": (HEADER + ROWS.replace("0.996000", "abc"), "line 6", "not a number"),
    "unknown status": (HEADER + ROWS.replace("\tdiscard\tdepth 9", "\tkept\tdepth 9"), "line 6", "status"),
    "only header": (HEADER, "", "no experiments yet"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_file_fails_with_one_line(tmp_path, capsys, case):
    text, where, problem = BAD[case]
    path = _write(tmp_path, text)
    assert analysis.main([str(path), "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert str(path) in err and where in err and problem in err
    assert list(tmp_path.iterdir()) == [path]  # no png, no temp file


def test_bad_line_through_the_cli(tmp_path):
    path = _write(tmp_path, HEADER + ROWS.replace("0.996000", "abc"))
    proc = run(path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"{path} line 6:" in proc.stderr
    assert list(tmp_path.iterdir()) == [path]


def test_missing_file(tmp_path):
    proc = run(tmp_path / "nope.tsv")
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "nope.tsv" in proc.stderr
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
