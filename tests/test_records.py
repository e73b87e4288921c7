"""The harness's own record of each evaluation (evaluations.jsonl), the report's join of results.tsv to it, and the
keep guard: real toy runs of train.py in a git repo, numbers forged the ways an agent or a typo would."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, set_lines, toy_repo
from harness import evaluations
from harness.formats import RESULTS_HEADER, parse_summary

FORGE = "val_bpb -= 0.1  # a better number than the harness measured\n"
SHRINK = "import prepare\nprepare.EVAL_TOKENS = 64 * 2  # evaluate on fewer rows\n"


@pytest.fixture(scope="module")
def night(tmp_path_factory, tiny_cache):
    """A repo at toy size and four runs: honest, forged by printing, evaluated on fewer rows, and a dirty tree."""
    repo = tmp_path_factory.mktemp("records") / "repo"
    env, git = toy_repo(repo, tiny_cache)

    def run(name):
        with open(repo / "run.log", "w") as log:
            code = subprocess.run([sys.executable, "train.py"], cwd=repo, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=300).returncode
        text = (repo / "run.log").read_text()
        assert code == 0, text[-3000:]
        check = subprocess.run([sys.executable, str(ROOT / "analysis.py"), "--check", "run.log"], cwd=repo, env=env,
                               capture_output=True, text=True)
        return dict(commit=git("rev-parse", "HEAD"), log=text, summary=parse_summary(text), check=check, name=name)

    def commit_edit(message, find, add):
        src = (repo / "train.py").read_text()
        assert src.count(find) == 1
        (repo / "train.py").write_text(src.replace(find, find + add))
        git("commit", "-qam", message)

    out = {"honest": run("honest")}
    commit_edit("forge the number", "    val_bpb = evaluate_bpb(model, tokenizer, device_batch_size)\n", FORGE)
    out["forged"] = run("forged")
    git("reset", "-q", "--hard", "HEAD~1")
    commit_edit("evaluate on fewer rows", "import torch.nn.functional as F\n", SHRINK)
    out["shrunk"] = run("shrunk")
    git("reset", "-q", "--hard", "HEAD~1")
    set_lines(repo / "train.py", {"MATRIX_LR": "0.05"})   # edited, never committed
    out["dirty"] = run("dirty")
    git("checkout", "-q", "train.py")
    out["records"], bad = evaluations.read(repo / evaluations.RECORDS_FILE)
    assert bad == 0
    return repo, out


def report(repo, rows):
    (repo / "results.tsv").write_text("\t".join(RESULTS_HEADER) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, str(ROOT / "analysis.py"), "--no-png"], cwd=repo, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    js = subprocess.run([sys.executable, str(ROOT / "analysis.py"), "--json", "--no-png"], cwd=repo,
                        capture_output=True, text=True)
    return proc.stdout, json.loads(js.stdout)


@pytest.mark.slow
def test_each_evaluation_is_recorded_by_the_harness(night):
    repo, out = night
    records = out["records"]
    assert len(records) == 4   # one per run, in order, whatever train.py printed
    honest, forged, shrunk, dirty = records
    assert honest["commit"] == out["honest"]["commit"] and honest["dirty"] is False and not honest["smoke"]
    assert f"{honest['val_bpb']:.6f}" == out["honest"]["summary"]["val_bpb"]
    assert honest["constants"] == honest["frozen_constants"] == dict(MAX_SEQ_LEN=64, EVAL_TOKENS=512,
                                                                     VOCAB_SIZE=8192, TIME_BUDGET=300)
    assert honest["constants_frozen"] is True and honest["budget"]["frozen"]["STEP_BUDGET"] == 1 and honest["seed"] == 42
    assert honest["budget"]["timed_steps"] == 1 and honest["budget"]["UNTIMED_STEPS"] == 11
    assert honest["gpu"] == "cpu" and honest["attention"] == "sdpa-cpu" and honest["eval_batch_size"] == 2
    assert honest["dataset"] == out["honest"]["summary"]["dataset"] and honest["torch"]
    assert isinstance(honest["test_bpb"], float) and honest["test_bpb"] > 0   # the held-out test split, scored
    assert honest["train_sha256"] and honest["time"]
    # the forged run printed 0.1 less than the harness measured; the record holds what was measured
    assert float(out["forged"]["summary"]["val_bpb"]) == pytest.approx(forged["val_bpb"] - 0.1, abs=2e-6)
    assert shrunk["constants"]["EVAL_TOKENS"] == 128 and shrunk["constants_frozen"] is False
    assert dirty["dirty"] is True and dirty["commit"] == out["honest"]["commit"]


@pytest.mark.slow
def test_the_test_score_is_never_printed(night):
    _, out = night
    for run in ("honest", "forged", "shrunk", "dirty"):
        assert "test_bpb" not in out[run]["log"].lower() and "test" not in out[run]["summary"]


@pytest.mark.slow
def test_the_report_says_which_rows_the_harness_backs(night):
    repo, out = night
    honest, forged = out["honest"], out["forged"]
    typo = f"{float(honest['summary']['val_bpb']) + 0.01:.6f}"   # one digit off
    text, js = report(repo, [
        (honest["commit"][:7], honest["summary"]["val_bpb"], "0.0", "keep", "baseline"),
        (forged["commit"][:7], forged["summary"]["val_bpb"], "0.0", "keep", "forge the number"),
        (honest["commit"][:7], typo, "0.0", "discard", "baseline rerun, seed 1 (noise)"),
    ])
    assert text.splitlines()[0] == "1 of 3 rows backed by the harness (evaluations.jsonl)"
    assert (js["backed"], [r["line"] for r in js["not_backed"]]) == (1, [3, 4])
    assert js["not_backed"][0]["why"].startswith("the harness measured ") and "(mistyped or forged)" in \
        js["not_backed"][0]["why"]
    assert f"the harness measured {out['records'][1]['val_bpb']:.6f}" in js["not_backed"][0]["why"]
    assert f"{out['records'][0]['val_bpb']:.6f}" in js["not_backed"][1]["why"]
    assert js["baseline"]["test_bpb"] == pytest.approx(out["records"][0]["test_bpb"], abs=1e-6)


@pytest.mark.slow
def test_changed_constants_and_a_dirty_tree_back_nothing(night):
    repo, out = night
    shrunk, dirty = out["shrunk"], out["dirty"]
    text, js = report(repo, [
        (shrunk["commit"][:7], shrunk["summary"]["val_bpb"], "0.0", "keep", "baseline"),
        (dirty["commit"][:7], dirty["summary"]["val_bpb"], "0.0", "discard", "matrix lr 0.05"),
    ])
    assert js["backed"] == 0
    why = [r["why"] for r in js["not_backed"]]
    assert why[0] == "evaluation constants that were not the frozen ones (EVAL_TOKENS=128)"
    assert why[1] == "a run of a dirty tree (train.py differed from its commit)"
    assert "EVAL_TOKENS=128" in text


@pytest.mark.slow
def test_the_keep_guard_refuses_what_the_record_does_not_back(night):
    _, out = night
    assert out["honest"]["check"].returncode == 0, out["honest"]["check"].stderr
    assert out["honest"]["check"].stdout.startswith(f"backed: the harness measured val_bpb "
                                                    f"{out['honest']['summary']['val_bpb']}")
    for run, why in (("forged", "(mistyped or forged)"), ("shrunk", "not the frozen ones"), ("dirty", "dirty tree")):
        check = out[run]["check"]
        assert check.returncode == 1 and check.stdout == "", (run, check.stdout)
        line = check.stderr.strip()
        assert "\n" not in line and why in line and line.endswith("do not keep it"), (run, line)


def test_without_records_the_report_says_they_are_absent(tmp_path):
    (tmp_path / "results.tsv").write_text("\t".join(RESULTS_HEADER) + "\na1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n")
    proc = subprocess.run([sys.executable, str(ROOT / "analysis.py"), "--no-png"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("records absent: no evaluations.jsonl")
