"""
parallel.py on a real Ray cluster, its rule book (parallel.md), and the single-GPU path without Ray.

One local head per module, started the README's way (`parallel.py start-head`) on free ports with 2 logical
GPUs and 2 CPUs, every listener on 127.0.0.1, and stopped by its own process id. A scripted agent follows
parallel.md on a toy repo (the user's toy-size edits committed, as in test_program.py): its shell commands are
the document's own code blocks, placeholders filled in, so the test breaks when the document and the tool drift
apart. train.py runs on the CPU with a step budget: decisions come from outcomes (statuses, exit codes, and the
val_bpb each commit and seed was given by the test, conftest.scripted_train_py), never from timings or from what
the toy model learns; timeouts are only upper bounds for a hang. A second toy night starts on a node whose
environment does not exist yet, with a uv that makes two builds at once fail every time.
"""

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import fails_in_one_line, set_outcome
from harness import evaluations
from harness.formats import PARALLEL_HEADER, summary_line
from test_program import code_blocks, make_repo, set_constants

ROOT = Path(__file__).resolve().parent.parent
UPPER_BOUND = 900          # seconds: only a guard against a hang, never a decision
HANG_LIMIT = 20            # the hanging run's time limit (`timeout 600` in real use)
# The toy baseline (two micro-steps of 8 sequences) also has a too-small Muon lr, so that two independent fixes
# both win one wave. Outcomes in nats above uniform per SEED (val_bpb is linear in them): wave 0's margin is 0.04,
# and every decision below is at least half of it from its threshold.
BASELINE_EDITS = {"DEPTH": "2", "ASPECT_RATIO": "32", "HEAD_DIM": "32", "DEVICE_BATCH_SIZE": "8",
                  "TOTAL_BATCH_SIZE": "8 * 64 * 2", "UNEMBEDDING_LR": "0.0004", "MATRIX_LR": "0.004"}
BASELINE = {42: 0.30, 1: 0.32, 2: 0.34}
FIX_A = ("unembedding lr 0.0004 -> 0.004", {"UNEMBEDDING_LR": "0.004"}, {42: 0.20})   # delta -0.10: the best winner
FIX_B = ("matrix lr 0.004 -> 0.04", {"MATRIX_LR": "0.04"}, {42: 0.24})                # delta -0.06: a winner too
B_ON_A = {42: 0.18}   # B re-applied on A: delta -0.02 against A's control, short of the margin
CRASH = ("typo in the model", {"HEAD_DIM": "undefined_name"})
HANG = ("sleep before training", {"WARMDOWN_RATIO": '__import__("time").sleep(3600) or 0.5'})
P = "uv run --group parallel parallel.py"   # parallel.md's `P`, written out in full as it asks
COLLISION = "failed to remove directory"   # what uv says when two builds of one environment collide
def ray_or_skip():
    try:
        import ray.job_submission  # noqa: F401
    except ImportError:
        pytest.skip("Ray is not installed: run the tests with `uv run --group parallel pytest` (README)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ps(columns):
    return [line.split() for line in subprocess.run(["ps", "-A", "-o", columns], capture_output=True,
                                                    text=True).stdout.splitlines()]


def session_members(sid):
    return [int(pid) for pid, s in ps("pid=,sid=") if int(s) == sid]


def all_pids():
    return [int(pid) for (pid,) in ps("pid=")]


def uv_command():
    return [shutil.which("uv")] if shutil.which("uv") else [sys.executable, "-m", "uv"]


# ---------------------------------------------------------------------------------------------------------------
# The single-GPU path stays free of Ray

def test_default_install_has_no_ray():
    """`uv run train.py` installs the default groups only: Ray comes with `--group parallel` and nothing else."""
    def exported(*extra):
        out = subprocess.run([*uv_command(), "export", "--frozen", "--no-hashes", *extra], cwd=ROOT,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return {line.split("==")[0] for line in out.stdout.splitlines() if "==" in line}
    default, parallel = exported(), exported("--group", "parallel")
    assert "ray" not in default and "torch" in default and "pytest" in default
    assert "ray" in parallel and default <= parallel


def test_harness_and_report_never_import_ray(tmp_path):
    """prepare.py and analysis.py import with a Ray that explodes on import, and do not load parallel.py."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('Ray imported on the single-GPU path')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    code = "import sys, prepare, analysis; assert 'parallel' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    source = (ROOT / "train.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(ray|parallel)\b", source, re.M)


def test_without_ray_the_tool_says_how_to_get_it(tmp_path):
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('no ray')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "parallel.py"), "list"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == ("parallel.py: Ray is not installed: run this tool as "
                                  "`uv run --group parallel parallel.py ...`")




# ---------------------------------------------------------------------------------------------------------------
# One rule book: parallel.md keeps program.md's setup, step by step

def setup_steps(markdown):
    """The numbered steps of a document's "## Setup": (number, the bold title that opens the step)."""
    section = re.search(r"^## Setup\n(.*?)^## ", markdown, re.M | re.S)[1]
    return re.findall(r"^(\d+)\. \*\*(.+?)\*\*", section, re.M)


def test_parallel_md_setup_names_every_program_md_step_in_order():
    program, parallel = (ROOT / "program.md").read_text(), (ROOT / "parallel.md").read_text()
    steps = setup_steps(program)
    assert len(steps) >= 5 and [n for n, _ in steps] == [str(i) for i in range(1, len(steps) + 1)]
    assert setup_steps(parallel) == steps
    notes_step = re.search(r"^5\. .*?(?=^6\. )", re.search(r"^## Setup\n(.*?)^## ", parallel, re.M | re.S)[1],
                           re.M | re.S)[0]
    assert "notes.md" in notes_step and "P collect" in notes_step   # notes.md by hand, results.tsv by collect


# ---------------------------------------------------------------------------------------------------------------
# collect on a scripted cluster: the harness's record decides the number (no Ray needed)

class FakeCluster:
    """What collect reads from Ray: finished jobs with their metadata, and their logs."""

    def __init__(self):
        self.jobs, self.logs = [], {}

    def add(self, run, log, status="SUCCEEDED", code=0, message=None, **metadata):
        start = 1_800_000_000_000 + 1000 * len(self.jobs)
        self.jobs.append(SimpleNamespace(submission_id=run, status=status, driver_exit_code=code, message=message,
                                         metadata={"branch": "autoresearch/t", "seed": "42", "control": "",
                                                   **metadata},
                                         start_time=start, end_time=start + 500, runtime_env={}))
        self.logs[run] = log

    def list_jobs(self):
        return self.jobs

    def get_job_logs(self, run):
        return self.logs[run]


def entrypoint_log(val_bpb=None, printed=None, record=None, gpu="none", code=0, started=True, said=None):
    """A run's log as the entrypoint and train.py write it: the summary block printing `printed` (default: the
    record's val_bpb to 6 decimals), the harness's record, the exit code."""
    lines = ["parallel: run r on node in /tmp/r, CUDA_VISIBLE_DEVICES=0", "parallel: threads 1 (test)",
             f"parallel: gpu {gpu}"]
    if said:
        return "\n".join(lines + [f"parallel: not started: {said}"]) + "\n"
    if started:
        lines += ["parallel: train.py starts", "device: cpu"]
    if val_bpb is not None:
        lines += ["---", summary_line("val_bpb", printed or f"{val_bpb:.6f}"), summary_line("peak_vram_mb", "0.0")]
    if record is not None:
        lines.append(f"parallel: record {json.dumps(record)}")
    if started:
        lines.append(f"parallel: exit code {code}")
    return "\n".join(lines) + "\n"


def harness_record(sha, train_py, val_bpb, dataset="tiny/data", attention="sdpa (fallback)"):
    """The fields of the harness's record (harness/evaluations.py) that collect checks, as a run outside git
    writes them: the commit from AUTORESEARCH_COMMIT, dirty unknown."""
    return dict(commit=sha, train_sha256=hashlib.sha256(train_py.encode()).hexdigest(), val_bpb=val_bpb,
                dataset=dataset, attention=attention, smoke=False, dirty=None, constants_frozen=True,
                constants={"MAX_SEQ_LEN": 64}, frozen_constants={"MAX_SEQ_LEN": 64}, seed=42, test_bpb=val_bpb + 0.01)


@pytest.fixture
def scripted(tmp_path, monkeypatch):
    """parallel.py's commands in a small git repo of two commits, talking to a FakeCluster."""
    import parallel
    monkeypatch.chdir(tmp_path)
    env = {"GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@x", "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@x"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    git = lambda *args: subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q", "-b", "autoresearch/t")
    sources, shas = ["DEPTH = 8\n", "DEPTH = 9\n"], []
    for source, subject in zip(sources, ["toy", "depth 9"]):
        (tmp_path / "train.py").write_text(source)
        git("add", "train.py")
        git("commit", "-qm", subject)
        shas.append(git("rev-parse", "HEAD"))
    cluster = FakeCluster()
    monkeypatch.setattr(parallel, "job_client", lambda: cluster)

    def collect():
        parallel.main(["collect"])
        return parallel.read_results(tmp_path / "results.tsv")
    return SimpleNamespace(cluster=cluster, collect=collect, shas=shas, sources=sources, path=tmp_path)


def test_collect_takes_each_number_from_the_harness_record(scripted, capsys):
    (base, cand), (base_py, cand_py) = scripted.shas, scripted.sources
    run = lambda sha, wave, seed=42, attempt="": f"ar-t-{sha[:12]}-s{seed}-w{wave}{attempt}"
    c = scripted.cluster
    c.add(run(base, 0), entrypoint_log(0.9123456789, record=harness_record(base, base_py, 0.9123456789)),
          commit=base, wave="0", description="baseline")
    c.add(run(base, 0, 1), entrypoint_log(0.95, record=harness_record(base, base_py, 0.95)), commit=base, wave="0",
          description="baseline", seed="1")
    rows = scripted.collect()
    assert [(r["val_bpb"], r["status"], r["description"]) for r in rows] == [
        ("0.912346", "discard", "baseline"), ("0.950000", "discard", "baseline, seed 1 (noise)")]
    text = (scripted.path / "results.tsv").read_text().replace("\tdiscard\tbaseline\t", "\tkeep\tbaseline\t", 1)
    (scripted.path / "results.tsv").write_text(text)   # the agent kept the baseline

    wave1 = {  # run id -> (log, metadata)
        "control": (run(base, 1), entrypoint_log(0.91, record=harness_record(base, base_py, 0.91)),
                    dict(commit=base, control="1", description="control")),
        "forged": (run(cand, 1), entrypoint_log(0.85, printed="0.800000", record=harness_record(cand, cand_py, 0.85)),
                   {}),
        "other commit": (run(cand, 1, 1), entrypoint_log(0.85, record=harness_record(base, cand_py, 0.85)),
                         dict(seed="1")),
        "other train.py": (run(cand, 1, 2), entrypoint_log(0.85, record=harness_record(cand, base_py, 0.85)),
                           dict(seed="2")),
        "no record": (run(cand, 1, 3), entrypoint_log(0.85), dict(seed="3")),
        "dataset": (run(cand, 1, 4), entrypoint_log(0.85, record=harness_record(cand, cand_py, 0.85, dataset="x/y")),
                    dict(seed="4")),
        "attention": (run(cand, 1, 5), entrypoint_log(0.85, record=harness_record(cand, cand_py, 0.85,
                                                                                  attention="fa3:x@1")),
                      dict(seed="5")),
        "another GPU type": (run(cand, 1, 6), entrypoint_log(0.85, gpu="NVIDIA H100",
                                                             record=harness_record(cand, cand_py, 0.85,
                                                                                   attention="fa3:x@1")),
                             dict(seed="6")),
        "train.py crash": (run(cand, 1, 7), entrypoint_log(code=1), dict(seed="7", status="FAILED", code=1)),
    }
    for log_run, log, meta in wave1.values():
        c.add(log_run, log, **{"commit": cand, "wave": "1", "description": "depth 9", **meta})
    capsys.readouterr()
    rows = {r["run"]: r for r in scripted.collect()}
    out = capsys.readouterr().out
    row = lambda name: rows[wave1[name][0]]
    assert row("control")["description"] == "control (wave 1): baseline (noise)"
    assert row("control")["status"] == "discard" and row("another GPU type")["status"] == "discard"
    expected = {
        "forged": "depth 9 (not backed: train.py printed val_bpb 0.800000, the harness measured 0.850000)",
        "other commit": f"depth 9, seed 1 (noise) (not backed: the record is of commit {base[:7]}, not {cand[:7]})",
        "other train.py": f"depth 9, seed 2 (noise) (not backed: the train.py that ran is not {cand[:7]}'s)",
        "no record": "depth 9, seed 3 (noise) (not backed: the harness wrote no record of the run)",
        "dataset": "depth 9, seed 4 (noise) (dataset changed to x/y)",
        "attention": "depth 9, seed 5 (noise) (attention changed to fa3:x@1)",
        "train.py crash": "depth 9, seed 7 (noise) (exit 1)"}
    for name, description in expected.items():
        assert (row(name)["status"], row(name)["val_bpb"], row(name)["description"]) == (
            "crash", "0.000000", description), name
    assert out.strip().endswith(f"{len(wave1)} new rows in results.tsv")

    # Every number in results.tsv is backed by a record beside it, as the morning report checks (analysis.py)
    records, bad = evaluations.read(scripted.path / "evaluations.jsonl")
    assert bad == 0 and sorted(r["run"] for r in records) == sorted(
        [run(base, 0), run(base, 0, 1), row("control")["run"], row("another GPU type")["run"]])
    for r in scripted.collect():
        if r["status"] != "crash":
            record, why = evaluations.backing(r["commit"], float(r["val_bpb"]), records)
            assert record is not None, why
    assert [r["val_bpb"] for r in records if r["run"] == run(base, 0)] == [0.9123456789]   # full precision


def test_collect_names_runs_that_never_started_train_py(scripted, capsys):
    """No row for a run the infrastructure broke (it is no result); named, with the command that retries it, until a
    later attempt replaces it."""
    base, base_py = scripted.shas[0], scripted.sources[0]
    c, run = scripted.cluster, f"ar-t-{base[:12]}-s42-w0"
    c.add(run, entrypoint_log(said="building the environment /n/venv failed (exit 2)"), status="FAILED", code=2,
          commit=base, wave="0", description="baseline")
    c.add(f"{run[:-1]}1", "", status="FAILED", code=None, message="Job supervisor actor died\nmore", commit=base,
          wave="1", description="baseline")
    c.add(f"{run[:-1]}2", entrypoint_log(0.9, record=harness_record(base, base_py, 0.9)), status="STOPPED", code=-15,
          commit=base, wave="2", description="baseline")
    assert [r["description"] for r in scripted.collect()] == ["baseline (stopped)"]   # stopped by the agent: a row
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        f"{run}: not started (building the environment /n/venv failed (exit 2)); no row: it is no result. Run it "
        f"again with `uv run --group parallel parallel.py submit --retry {run}`",
        f"{run[:-1]}1: not started (it never started or its node was lost: Job supervisor actor died); no row: it "
        f"is no result. Run it again with `uv run --group parallel parallel.py submit --retry {run[:-1]}1`"]
    c.add(f"{run}-a2", entrypoint_log(0.9, record=harness_record(base, base_py, 0.9)), commit=base, wave="0",
          description="baseline")
    rows = scripted.collect()
    out = capsys.readouterr().out
    assert [(r["run"], r["description"], r["val_bpb"]) for r in rows[1:]] == [(f"{run}-a2", "baseline", "0.900000")]
    assert f"{run}:" not in out and f"{run[:-1]}1: not started" in out   # the retried one is no longer named


def test_submit_and_log_refuse_bad_input_in_one_line(scripted):
    def tool(*args):
        return subprocess.run([sys.executable, str(ROOT / "parallel.py"), *args], cwd=scripted.path,
                              capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:9"})
    fails_in_one_line(tool("submit", "HEAD"), "COMMIT... --wave N (or --retry RUN)")
    fails_in_one_line(tool("submit", "HEAD", "--wave", "1", "--retry", "ar-x"), "give no commits, no --wave")
    fails_in_one_line(tool("submit", "--retry", "ar-x", "--seed", "1"), "and no other option")
    fails_in_one_line(tool("submit", "HEAD", "--wave", "1", "--threads", "0"), "--threads 0: give at least 1")
    fails_in_one_line(tool("log", "ar-x", "-n", "0"), "-n 0: give at least 1 line")


# ---------------------------------------------------------------------------------------------------------------
# A real local cluster

def toy_repo(base, cache):
    """A toy repo with parallel.py and parallel.md in it, and the environment every node of the cluster would have."""
    repo, env = make_repo(base, cache, outcome=BASELINE)
    for name in ("parallel.py", "parallel.md"):   # harness/ (its formats and records) is there already
        shutil.copy(ROOT / name, repo / name)
    set_constants(repo / "train.py", BASELINE_EDITS)
    git = lambda *args: subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)
    git("add", "-A")
    git("commit", "-qm", "toy baseline with a small matrix lr")
    env = {k: v for k, v in env.items()
           if not k.startswith("RAY_") and k not in ("CUDA_VISIBLE_DEVICES", "VIRTUAL_ENV")}
    # One timed step a run; its threads are the cluster's (2 CPUs / 2 GPUs: 1), whatever this environment's
    # OMP_NUM_THREADS is
    env["AUTORESEARCH_STEP_BUDGET"] = "1"
    # The synced environment, by a path of this test's own: a run's lock file goes beside it, never into the repo
    (base / "venv").symlink_to(env["UV_PROJECT_ENVIRONMENT"])
    env["UV_PROJECT_ENVIRONMENT"] = str(base / "venv")
    return repo, env


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_cache):
    ray_or_skip()
    return toy_repo(tmp_path_factory.mktemp("parallel"), tiny_cache)


@pytest.fixture(scope="module")
def cluster(toy):
    """The README's single-box recipe: start-head, export RAY_ADDRESS; stop-head at the end."""
    ray_or_skip()
    repo, env = toy
    temp_dir = tempfile.mkdtemp(prefix="ar-ray-", dir="/tmp")   # unix socket paths must stay under ~107 chars
    port, dashboard = free_port(), free_port()
    start = subprocess.run([*uv_command(), "run", "--group", "parallel", "parallel.py", "start-head",
                            "--num-gpus", "2", "--num-cpus", "2", "--port", str(port), "--dashboard-port",
                            str(dashboard), "--temp-dir", temp_dir], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=UPPER_BOUND)
    assert start.returncode == 0, start.stdout + start.stderr
    address = re.search(r"^export RAY_ADDRESS=(\S+)$", start.stdout, re.M)[1]
    assert address == f"http://127.0.0.1:{dashboard}"
    head_pid = json.loads((Path(temp_dir) / "autoresearch-head.json").read_text())["pid"]
    try:
        yield dict(address=address, temp_dir=temp_dir, head_pid=head_pid, env={**env, "RAY_ADDRESS": address})
    finally:
        session = session_members(head_pid)   # the Ray processes that start-head started, in its session
        stop = subprocess.run([*uv_command(), "run", "--group", "parallel", "parallel.py", "stop-head",
                               "--temp-dir", temp_dir], cwd=repo, env=env, capture_output=True, text=True)
        assert stop.returncode == 0, stop.stderr
        assert head_pid in session and not set(session) & set(all_pids())
        shutil.rmtree(temp_dir, ignore_errors=True)


class Agent:
    """Follows parallel.md: every shell command is one of its code blocks (or, for the setup steps it keeps as they
    are, program.md's), with the placeholders filled in; `extra` is what the human asked to add to every submit."""

    def __init__(self, repo, env, tag="test", extra=()):
        self.repo, self.env, self.tag, self.extra = repo, env, tag, list(extra)
        self.blocks = code_blocks((repo / "parallel.md").read_text())
        self.program = code_blocks((repo / "program.md").read_text())

    def block(self, *needles, program=False):
        found = {b for b in (self.program if program else self.blocks) if all(n in b for n in needles)}
        assert len(found) == 1, f"{'program' if program else 'parallel'}.md: one code block with {needles}? {found}"
        return found.pop()

    def fill(self, command, wave=None, run=None, commit=None, message=None):
        command = command.replace("<tag>", self.tag).replace("<run>", str(run)).replace("<commit>", str(commit))
        command = command.replace("<what you changed>", str(message))
        if wave is not None:
            command = command.replace("--wave W+1", f"--wave {wave + 1}").replace("--wave W", f"--wave {wave}")
        if "parallel.py submit" in command and "--retry" not in command:
            command = " ".join([command.split("  #")[0], *map(shlex.quote, self.extra)])
        return command

    def sh(self, command, check=True):
        proc = subprocess.run(["bash", "-c", command], cwd=self.repo, env=self.env, capture_output=True, text=True,
                              timeout=UPPER_BOUND)
        assert not check or proc.returncode == 0, (command, proc.stdout, proc.stderr)
        return proc

    def lines(self, block, **values):
        """Each line of a block, filled in and run in turn; their outputs."""
        return [self.sh(self.fill(line, **values)).stdout for line in block.splitlines()]

    def P(self, *args, check=True):
        """A command that parallel.md names only in its table (list, stop, report) or that the test adds."""
        return self.sh(" ".join([P, *map(shlex.quote, args)]), check=check)

    def git(self, *args, check=True):
        proc = subprocess.run(["git", *args], cwd=self.repo, env=self.env, capture_output=True, text=True)
        assert not check or proc.returncode == 0, (args, proc.stderr)
        return proc.stdout.strip()

    def setup(self, gpus):
        """parallel.md's setup: program.md's steps 2 and 4 (its data check), then the cluster check and notes.md."""
        self.sh(self.block("git checkout -b autoresearch/<tag>", program=True).replace("<tag>", self.tag))
        shown = self.sh(self.block("print(p.DATASET)", program=True)).stdout.splitlines()
        self.dataset = shown[0]
        assert self.sh(self.block("parallel.py list")).stdout.strip() == "no runs on this cluster"
        template = self.block("# Notes: autoresearch/<tag>", program=True).replace("<tag>", self.tag)
        notes = "".join(line + "\n" for line in template.splitlines() if line.startswith("#") or not line.strip())
        (self.repo / "notes.md").write_text(notes.replace("## Noise\n", f"## Noise\nGPUs: {gpus}\n"))

    def candidate(self, description, edits, outcome=None):
        """Edit (and set the outcome the test chose), commit, and go back to the best; the commit's hash is what
        gets submitted."""
        set_constants(self.repo / "train.py", edits)
        if outcome:
            set_outcome(self.repo / "train.py", outcome)
        self.git("commit", "-qam", description)
        sha = self.git("rev-parse", "HEAD")
        self.git("reset", "-q", "--hard", f"autoresearch/{self.tag}-best")   # parallel.md: back to the best by its tag
        return sha

    def submit_candidate(self, wave, description, edits, outcome=None, extra=()):
        """parallel.md's step 3 for one idea: edit, then its block (commit, submit, back to the best)."""
        set_constants(self.repo / "train.py", edits)
        if outcome:
            set_outcome(self.repo / "train.py", outcome)
        commit, submit, reset = self.block("git commit -am").splitlines()
        self.sh(self.fill(commit, message=description))
        sha = self.git("rev-parse", "HEAD")
        self.sh(" ".join([self.fill(submit, wave=wave), *extra]))
        self.sh(self.fill(reset))
        return sha

    def wait_and_collect(self):
        """parallel.md's block `wait` then `collect`; collect's output."""
        block = [b for b in self.blocks if b.splitlines() == [f"{P} wait", f"{P} collect"]]
        assert block, "parallel.md has no block `wait` then `collect`"
        return self.lines(block[0])[-1]

    def keep(self, run, commit):
        """parallel.md step 6: program.md's guard on the candidate's commit, then keep."""
        guard = self.sh(self.fill(self.block("git diff --quiet autoresearch/<tag>-base"), commit=commit), check=False)
        assert "frozen files unchanged" in guard.stdout
        return self.sh(self.fill(self.block("parallel.py keep <run>"), run=run), check=False)

    def rows(self, name="results.tsv"):
        lines = (self.repo / name).read_text().splitlines()
        header = lines[0].split("\t")
        assert header == list(PARALLEL_HEADER)
        return [dict(zip(header, line.split("\t"))) for line in lines[1:]]

    def decide(self, wave, margin):
        """parallel.md step 5: winners of the wave, best first (runs against the same GPU type's control)."""
        rows = [r for r in self.rows() if r["wave"] == str(wave)]
        best = self.git("rev-parse", "--short=7", "HEAD")
        controls = {r["gpu"]: float(r["val_bpb"]) for r in rows if r["description"].startswith("control")
                    and r["status"] != "crash"}
        winners = []
        for r in rows:
            if r["description"].startswith("control") or r["status"] != "discard" or r["gpu"] not in controls:
                continue
            delta = float(r["val_bpb"]) - controls[r["gpu"]]
            if delta <= -margin:
                winners.append((delta, r["run"], r["parent"] == best, r["commit"]))
        return sorted(winners)


def watch(address, runs):
    """Poll the cluster until the runs finish; return every (running, pending) pair of sets seen."""
    from ray.job_submission import JobSubmissionClient
    client, seen, deadline = JobSubmissionClient(address), [], time.time() + UPPER_BOUND
    while time.time() < deadline:
        jobs = {j.submission_id: str(j.status) for j in client.list_jobs() if j.submission_id in runs}
        seen.append(({r for r, s in jobs.items() if s == "RUNNING"}, {r for r, s in jobs.items() if s == "PENDING"}))
        if len(jobs) == len(runs) and not seen[-1][0] and not seen[-1][1]:
            return seen, {r: client.get_job_logs(r) for r in runs}
        time.sleep(0.5)
    raise AssertionError(f"runs did not finish within {UPPER_BOUND} s: {runs}")


def run_id(sha, seed, wave, tag="test"):
    return f"ar-{tag}-{sha[:12]}-s{seed}-w{wave}"   # the night's tag, from the branch autoresearch/<tag>


# ---------------------------------------------------------------------------------------------------------------
# A fresh node: its environment built once, whatever number of runs start together; a run that never reached
# train.py retried

FAKE_UV = """\
#!/bin/sh
# uv on a node whose environment does not exist yet (tests/test_parallel.py). A build holds until both runs that
# start together have started (the fake nvidia-smi marks each), then up to 5 s more for the other one to reach uv;
# a second build while one is under way fails as uv's does. Then the real uv runs, in the synced environment.
state='@STATE@'
case "$1" in run|sync)
  if [ -n "${VIRTUAL_ENV:-}" ]; then echo "$VIRTUAL_ENV" >> "$state/virtual_env"; fi
  if [ -e "$state/fail-once" ]; then
    rm "$state/fail-once"
    echo "error: @COLLISION@ \\`$UV_PROJECT_ENVIRONMENT/lib\\`: Directory not empty (os error 39)" >&2
    exit 2
  fi
  if [ ! -e "$UV_PROJECT_ENVIRONMENT/built" ]; then
    if ! mkdir "$state/building" 2>/dev/null; then
      touch "$state/collided"
      echo "error: @COLLISION@ \\`$UV_PROJECT_ENVIRONMENT/lib\\`: Directory not empty (os error 39)" >&2
      exit 2
    fi
    mkdir -p "$UV_PROJECT_ENVIRONMENT/lib"
    i=0
    while [ "$(ls "$state/arrived" | wc -l)" -lt 2 ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
    ls "$state/arrived" | wc -l >> "$state/builds"
    i=0
    while [ ! -e "$state/collided" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    touch "$UV_PROJECT_ENVIRONMENT/built"
    rmdir "$state/building"
  fi;;
esac
export UV_PROJECT_ENVIRONMENT='@REAL_ENV@' UV_NO_SYNC=1
exec @REAL_UV@ "$@"
"""
FAKE_NVIDIA_SMI = """\
#!/bin/sh
# No GPU here: marks the run as started (by its GPU index) and names no GPU, as a missing nvidia-smi would
touch '@STATE@/arrived/gpu'"${CUDA_VISIBLE_DEVICES:-}"
exit 1
"""


@pytest.fixture(scope="module")
def fresh_node(tmp_path_factory, tiny_cache, cluster):
    """Wave 0 of a night on a node whose environment directory does not exist yet: three runs of one commit
    submitted at once, two of them starting together on the 2 GPUs (the human adds `--env ...` to every submit:
    this node's uv and environment)."""
    base = tmp_path_factory.mktemp("fresh")
    repo, env = toy_repo(base, tiny_cache)
    state, tools, fresh = base / "uv-state", base / "node-bin", base / "node-venv"
    (state / "arrived").mkdir(parents=True)
    tools.mkdir()
    for name, text in (("uv", FAKE_UV), ("nvidia-smi", FAKE_NVIDIA_SMI)):
        text = text.replace("@STATE@", str(state)).replace("@COLLISION@", COLLISION)
        text = text.replace("@REAL_ENV@", env["UV_PROJECT_ENVIRONMENT"]).replace("@REAL_UV@", shlex.join(uv_command()))
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    agent = Agent(repo, {**env, "RAY_ADDRESS": cluster["address"]}, tag="fresh",
                  extra=["--env", f"PATH={tools}{os.pathsep}{env['PATH']}", "--env", f"UV_PROJECT_ENVIRONMENT={fresh}"])
    agent.setup(gpus=2)
    sha = agent.git("rev-parse", "HEAD")
    agent.sh(agent.fill(agent.block("--seed 42 1 2").splitlines()[0]))
    runs = [run_id(sha, seed, 0, "fresh") for seed in (42, 1, 2)]
    collected = agent.wait_and_collect()
    from ray.job_submission import JobSubmissionClient
    logs = {run: JobSubmissionClient(cluster["address"]).get_job_logs(run) for run in runs}
    return dict(agent=agent, state=state, fresh=fresh, sha=sha, runs=runs, logs=logs, collected=collected)


@pytest.mark.ray
def test_first_runs_on_a_fresh_node_all_run(fresh_node):
    """The node's environment is built once, by one run, while the other run that started with it waits; with
    the old entrypoint the second build failed every time (`failed to remove directory`, exit 2)."""
    state, rows = fresh_node["state"], fresh_node["agent"].rows()
    assert sorted((r["run"], r["status"]) for r in rows) == sorted((run, "discard") for run in fresh_node["runs"]), \
        fresh_node["collected"]
    assert all(re.fullmatch(r"\d\.\d{6}", r["val_bpb"]) for r in rows), fresh_node["collected"]
    assert (state / "builds").read_text().split() == ["2"]   # one build, with both first runs started
    assert not (state / "collided").exists() and (fresh_node["fresh"] / "built").exists()
    for log in fresh_node["logs"].values():
        assert COLLISION not in log
        assert "parallel: threads 1 (the node's 2 CPUs / 2 GPUs; --threads to override)" in log.splitlines()


@pytest.mark.ray
def test_runs_have_a_clean_environment(fresh_node):
    """No run sees the VIRTUAL_ENV of whoever started the node (uv warned about it in every run's log)."""
    assert not (fresh_node["state"] / "virtual_env").exists()
    assert all("does not match the project environment" not in log for log in fresh_node["logs"].values())


@pytest.fixture(scope="module")
def retried(fresh_node):
    """Wave 1 of the fresh node's night: a candidate whose run dies before train.py starts (its node's environment
    step fails once), collected, resubmitted, retried as parallel.md says."""
    agent, state = fresh_node["agent"], fresh_node["state"]
    (state / "fail-once").touch()
    sha = agent.submit_candidate(1, *FIX_A)
    run = run_id(sha, 42, 1, "fresh")
    out = dict(run=run, sha=sha, first=agent.wait_and_collect(), listed=agent.P("list").stdout,
               again=agent.P("submit", sha, "--wave", "1").stdout)
    retry = agent.block("submit --retry <run>")
    out["retry"] = agent.sh(agent.fill(retry, run=run)).stdout
    out["second"] = agent.wait_and_collect()
    out["twice"] = agent.sh(agent.fill(retry, run=run), check=False)
    out["ran"] = agent.sh(agent.fill(retry, run=fresh_node["runs"][0]), check=False)
    out["unknown"] = (agent.sh(agent.fill(retry, run="ar-fresh-none"), check=False),
                      agent.P("log", "ar-fresh-none", check=False))
    out["rows"] = agent.rows()
    return out


@pytest.mark.ray
def test_a_run_that_died_before_train_py_is_retried(retried, fresh_node):
    run = retried["run"]
    why = f"building the environment {fresh_node['fresh']} failed (exit 2)"
    assert f"{run}: not started ({why}); no row" in retried["first"]
    assert f"--retry {run}`" in retried["first"] and retried["first"].strip().endswith("0 new rows in results.tsv")
    assert re.search(rf"^{run}  not started ", retried["listed"], re.M)
    assert retried["again"].startswith(f"{run}: already submitted (FAILED), nothing to do; it did not start")
    assert retried["retry"].startswith(f"{run}-a2: submitted again ({run} did not start: {why})")
    rows = [r for r in retried["rows"] if r["wave"] == "1"]
    assert [(r["run"], r["commit"], r["status"], r["description"], r["parent"]) for r in rows] == [
        (f"{run}-a2", retried["sha"][:7], "discard", FIX_A[0], fresh_node["sha"][:7])]
    assert re.fullmatch(r"\d\.\d{6}", rows[0]["val_bpb"])
    fails_in_one_line(retried["twice"], f"{run} was already retried as {run}-a2")
    fails_in_one_line(retried["ran"], "train.py ran and exited 0", "never retried")
    fails_in_one_line(retried["unknown"][0], "ar-fresh-none: no such run of this branch on the cluster")
    fails_in_one_line(retried["unknown"][1], "no such run on this cluster: ar-fresh-none")


# ---------------------------------------------------------------------------------------------------------------
# A night of waves, as parallel.md says

@pytest.fixture(scope="module")
def night(toy, cluster):
    """A scripted parallel night of three waves on 2 GPUs; the tests below read what it left behind."""
    repo, _ = toy
    agent = Agent(repo, cluster["env"])
    agent.setup(gpus=2)
    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(cluster["address"])
    out = {}

    # Wave 0: the baseline and two noise reruns, 3 runs on 2 GPUs.
    base = agent.git("rev-parse", "HEAD")
    submit, wait, collect = agent.block("--seed 42 1 2").splitlines()
    agent.sh(agent.fill(submit))
    out["resubmit"] = agent.P("submit", "HEAD", "--wave", "0", "--seed", "42").stdout
    out["wave0"] = [run_id(base, s, 0) for s in (42, 1, 2)]
    out["seen"], out["logs0"] = watch(cluster["address"], out["wave0"])
    agent.sh(agent.fill(wait))
    agent.sh(agent.fill(collect))
    out["after_first_collect"] = (repo / "results.tsv").read_text()
    out["second_collect"] = agent.sh(agent.fill(collect)).stdout
    out["after_second_collect"] = (repo / "results.tsv").read_text()
    margin = max(float(r["val_bpb"]) for r in agent.rows()) - min(float(r["val_bpb"]) for r in agent.rows())
    out["margin"] = margin
    # notes.md's dataset and attention lines, from the baseline's last lines
    shown = agent.sh(agent.fill(agent.block("parallel.py log <run>"), run=out["wave0"][0])).stdout
    out["baseline_log"] = shown
    noise = [f"{key}: {value.strip()}" for key, value in (line.split(":", 1) for line in shown.splitlines()
                                                          if line.startswith(("dataset:", "attention:")))]
    notes = (repo / "notes.md").read_text()
    (repo / "notes.md").write_text(notes.replace("## Noise\n", "## Noise\n" + "".join(f"{n}\n" for n in noise)))
    out["keep_baseline"] = agent.sh(agent.fill(agent.block("parallel.py keep <run>"), run=out["wave0"][0]))

    # Wave 1: control + two independent fixes; the process that submitted them is killed mid-wave.
    a, b = agent.candidate(*FIX_A), agent.candidate(*FIX_B)
    out["a"], out["b"] = a, b
    wave1 = [run_id(base, 42, 1), run_id(a, 42, 1), run_id(b, 42, 1)]
    control = agent.fill(agent.block("--control"), wave=1)
    script = f"{control} && {P} submit {a} {b} --wave 1 && {P} wait"
    submitter = subprocess.Popen(["bash", "-c", script], cwd=repo, env=agent.env, start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + UPPER_BOUND
    while time.time() < deadline:   # kill it once all three are on the cluster and one runs
        jobs = {j.submission_id: str(j.status) for j in client.list_jobs() if j.submission_id in wave1}
        if len(jobs) == 3 and "RUNNING" in jobs.values():
            break
        assert submitter.poll() is None, "the submitter ended before it could be killed"
        time.sleep(0.5)
    os.killpg(submitter.pid, signal.SIGKILL)
    submitter.wait()
    out["killed_with"] = jobs
    agent.P("wait", "--timeout", str(UPPER_BOUND))   # a new process picks the night up
    agent.sh(agent.fill(collect))
    winners = agent.decide(1, margin)
    out["winners1"] = winners
    assert [w[1] for w in winners] == [run_id(a, 42, 1), run_id(b, 42, 1)], winners
    kept = agent.keep(winners[0][1], winners[0][3])
    assert kept.returncode == 0, kept.stderr
    out["stale_keep"] = agent.keep(winners[1][1], winners[1][3])
    # Re-apply the stale winner on the new best (parallel.md step 6). A and B set adjacent lines in train.py, and
    # each its own outcome on one line: a conflict, so the same edit by hand, with the outcome B has on top of A.
    pick, resubmit, reset = agent.block("git cherry-pick <commit>").splitlines()
    picked = agent.sh(agent.fill(pick, commit=b), check=False)
    assert picked.returncode != 0, "the cherry-pick of B on A should conflict"
    agent.git("cherry-pick", "--abort")
    set_constants(repo / "train.py", FIX_B[1])
    set_outcome(repo / "train.py", B_ON_A)
    agent.git("commit", "-qam", f"{FIX_B[0]} (re-applied)")
    b2 = agent.git("rev-parse", "HEAD")
    agent.sh(agent.fill(resubmit, wave=1))
    agent.sh(agent.fill(reset))
    out["b2"] = b2

    # Wave 2: control, the re-applied winner, a crash and a hang (a short time limit, its own thread count).
    agent.sh(agent.fill(agent.block("--control"), wave=2))
    crash = agent.submit_candidate(2, *CRASH)
    hang = agent.submit_candidate(2, *HANG, extra=["--time-limit", str(HANG_LIMIT), "--threads", "2"])
    agent.wait_and_collect()
    winners = agent.decide(2, margin)
    out["winners2"] = winners
    for _, run, fresh, commit in winners:
        if fresh:
            agent.keep(run, commit)
    out["crash_log"] = agent.sh(agent.fill(agent.block("parallel.py log <run>"), run=run_id(crash, 42, 2))).stdout
    out["retry_crash"] = agent.sh(agent.fill(agent.block("submit --retry <run>"), run=run_id(crash, 42, 2)),
                                  check=False)
    out["hang_log"] = client.get_job_logs(run_id(hang, 42, 2))
    # Stop one: the hanging commit again, stopped while it runs, is collected as a crash.
    stopped = run_id(hang, 42, 3)
    agent.P("submit", hang, "--wave", "3")
    deadline = time.time() + UPPER_BOUND
    while str(client.get_job_status(stopped)) != "RUNNING":
        assert time.time() < deadline, f"{stopped} never started"
        time.sleep(0.5)
    out["stop"] = agent.P("stop", stopped).stdout
    agent.P("wait", "--timeout", str(UPPER_BOUND))
    out["stopped_status"] = str(client.get_job_status(stopped))
    agent.sh(agent.fill(collect))
    out.update(crash=crash, hang=hang, base=base, report=agent.P("report").stdout,
               list=agent.P("list").stdout, agent=agent)
    # The next night, on the same cluster, starts with none of this night's runs.
    agent.git("checkout", "-qb", "autoresearch/next")
    out["next_night"] = (agent.P("list").stdout, agent.P("collect", "--results", "next.tsv").stdout)
    agent.git("checkout", "-q", "autoresearch/test")
    return out


@pytest.mark.ray
def test_every_listener_is_on_loopback(cluster):
    import psutil
    head = psutil.Process(cluster["head_pid"])
    listening = [c.laddr for p in [head, *head.children(recursive=True)] for c in p.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for addr in listening), listening


@pytest.mark.ray
def test_two_runs_at_once_on_distinct_gpus_the_third_waits(night):
    seen, logs = night["seen"], night["logs0"]
    together = [running for running, pending in seen if len(running) == 2 and len(pending) == 1]
    assert together, "never saw 2 runs RUNNING with the third PENDING"
    assert max(len(running) for running, _ in seen) == 2   # never two runs on one GPU
    gpu = {run: re.search(r"^parallel: run .*, CUDA_VISIBLE_DEVICES=(\d+)$", log, re.M)[1]
           for run, log in logs.items()}
    for pair in together:
        assert len({gpu[run] for run in pair}) == 2, gpu
    # Three runs of one commit: each in a working directory of its own (Ray would share identical ones).
    dirs = {re.search(r"^parallel: run .* in (\S+), CUDA_VISIBLE_DEVICES", log, re.M)[1] for log in logs.values()}
    assert len(dirs) == 3


@pytest.mark.ray
def test_threads_fit_the_node_unless_given(night):
    """2 CPUs and 2 GPUs: one thread a run, said in its log; `--threads 2` overrides it."""
    for log in night["logs0"].values():
        assert "parallel: threads 1 (the node's 2 CPUs / 2 GPUs; --threads to override)" in log.splitlines()
    assert "parallel: threads 2 (--threads)" in night["hang_log"].splitlines()


@pytest.mark.ray
def test_three_runs_collected_into_correct_rows(night):
    rows = [r for r in night["agent"].rows() if r["wave"] == "0"]
    base = night["base"][:7]
    assert [(r["run"], r["commit"], r["status"], r["description"]) for r in rows] == [
        (night["wave0"][0], base, "keep", "baseline"),
        (night["wave0"][1], base, "discard", "baseline, seed 1 (noise)"),
        (night["wave0"][2], base, "discard", "baseline, seed 2 (noise)")]
    for r in rows:
        assert re.fullmatch(r"\d\.\d{6}", r["val_bpb"]) and r["memory_gb"] == "0.0" and r["gpu"] == "cpu"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", r["started"]) and r["ended"] >= r["started"]
    assert len({r["val_bpb"] for r in rows}) == 3   # the seeds reached train.py
    assert "already submitted" in night["resubmit"]
    assert night["second_collect"].strip().endswith("0 new rows in results.tsv")
    assert night["after_second_collect"] == night["after_first_collect"]
    assert night["keep_baseline"].returncode == 0


@pytest.mark.ray
def test_every_value_comes_from_the_harness_record(night):
    """Each row with a value is backed by the record its run's harness wrote (commit, train.py and val_bpb checked
    by collect, kept beside results.tsv for the morning report); the baseline's last lines show it and name the
    dataset and attention path that notes.md takes from them."""
    agent = night["agent"]
    records, bad = evaluations.read(agent.repo / "evaluations.jsonl")
    rows = [r for r in agent.rows() if r["status"] != "crash"]
    assert bad == 0 and sorted(r["run"] for r in records) == sorted(r["run"] for r in rows) and len(rows) == 8
    for row in rows:
        record, why = evaluations.backing(row["commit"], float(row["val_bpb"]), records)
        assert record is not None, why
    shown = night["baseline_log"].splitlines()
    assert len(shown) <= 50 and shown[-1] == "parallel: exit code 0"
    record = json.loads(re.search(r"^parallel: record (.*)$", night["baseline_log"], re.M)[1])
    assert record["commit"] == night["base"] and record["dirty"] is None   # outside git: AUTORESEARCH_COMMIT
    notes = (agent.repo / "notes.md").read_text()
    assert f"dataset: {record['dataset']}\n" in notes and f"attention: {record['attention']}\n" in notes
    assert agent.dataset == record["dataset"]   # program.md's data check on this machine: the runs' data


@pytest.mark.ray
def test_killed_submitter_loses_nothing(night):
    assert len(night["killed_with"]) == 3 and "RUNNING" in night["killed_with"].values()
    rows = [r for r in night["agent"].rows() if r["wave"] == "1"]
    assert sorted(r["run"] for r in rows) == sorted(run_id(s, 42, 1) for s in (night["base"], night["a"], night["b"]))
    assert all(r["status"] != "crash" for r in rows)
    control = next(r for r in rows if r["run"] == run_id(night["base"], 42, 1))
    assert control["description"] == "control (wave 1): baseline (noise)"   # the baseline's rows say baseline


@pytest.mark.ray
def test_crash_and_hang_become_crash_rows(night):
    rows = {r["run"]: r for r in night["agent"].rows()}
    crash, hang = rows[run_id(night["crash"], 42, 2)], rows[run_id(night["hang"], 42, 2)]
    assert (crash["status"], crash["val_bpb"], crash["memory_gb"]) == ("crash", "0.000000", "0.0")
    assert crash["description"] == f"{CRASH[0]} (exit 1)"
    assert hang["status"] == "crash" and hang["description"] == f"{HANG[0]} (exit 124, killed at the time limit)"
    shown = night["crash_log"].splitlines()   # parallel.md's way to read why: the last lines, the error among them
    assert len(shown) <= 50 and shown[-1] == "parallel: exit code 1" and "NameError" in night["crash_log"]


@pytest.mark.ray
def test_a_crash_of_train_py_is_never_retried(night):
    fails_in_one_line(night["retry_crash"], f"{run_id(night['crash'], 42, 2)}: train.py ran and exited 1",
                      "never retried")


@pytest.mark.ray
def test_a_stopped_run_becomes_a_crash_row(night):
    run = run_id(night["hang"], 42, 3)
    assert night["stop"].startswith(f"{run}: stopped") and night["stopped_status"] == "STOPPED"
    row = next(r for r in night["agent"].rows() if r["run"] == run)
    assert (row["status"], row["val_bpb"], row["description"]) == ("crash", "0.000000", f"{HANG[0]} (stopped)")


@pytest.mark.ray
def test_waves_follow_the_ratchet(night):
    agent, margin = night["agent"], night["margin"]
    rows = agent.rows()
    # Wave 1: both fixes beat the control by the margin; the better one is kept, the other's parent went stale.
    assert [fresh for _, _, fresh, _ in night["winners1"]] == [True, True]
    stale = night["stale_keep"]
    assert stale.returncode == 1 and f"is not the current best {night['a'][:7]}" in stale.stderr
    assert "git cherry-pick" in stale.stderr
    # Wave 2: the re-applied winner is judged against the new control, and on the new best it does not beat
    # it by the margin: it stays discarded (a win over a stale parent is not a win over the new best).
    assert night["winners2"] == []
    b2 = next(r for r in rows if r["run"] == run_id(night["b2"], 42, 2))
    assert b2["parent"] == night["a"][:7] and b2["status"] == "discard"
    control = next(r for r in rows if r["run"] == run_id(night["a"], 42, 2))
    assert control["description"] == f"control (wave 2): {FIX_A[0]} (noise)" and control["status"] == "discard"
    assert float(control["val_bpb"]) - margin < float(b2["val_bpb"]) < float(control["val_bpb"])
    # The branch: exactly the keeps, one after the other, no merges.
    log = agent.git("log", "--format=%H %P", "main..HEAD").splitlines()
    assert log == [f"{night['a']} {night['base']}"]
    assert agent.git("rev-parse", "autoresearch/test-best^{commit}") == night["a"]   # keep moved the tag
    assert [r["run"] for r in rows if r["status"] == "keep"] == [run_id(night["base"], 42, 0),
                                                                 run_id(night["a"], 42, 1)]


@pytest.mark.ray
def test_report_shows_waves_by_gpu_type(night):
    report = night["report"]
    lines = report.splitlines()
    assert lines[0].split() == ["wave", "runs", "crash", "keep", "hours", "GPUs", "busy", "runs/hour"]
    waves = {line.split()[0]: line.split()[1:4] for line in lines[1:6]}
    assert waves == {"0": ["3", "0", "1"], "1": ["3", "0", "1"], "2": ["4", "2", "0"], "3": ["1", "1", "0"],
                     "all": ["11", "3", "2"]}
    assert re.search(r"^cpu: 8 runs, best \d\.\d{6} ", report, re.M)
    assert "11 collected" in night["list"]


@pytest.mark.ray
def test_the_next_night_starts_clean(night):
    listed, collected = night["next_night"]
    assert listed.strip() == "no runs on this cluster" and collected.strip() == "0 new rows in next.tsv"
