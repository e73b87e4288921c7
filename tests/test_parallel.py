"""
parallel.py on a real Ray cluster, and the single-GPU path without Ray.

One local head per module, started the README's way (`parallel.py start-head`) on free ports with 2 logical
GPUs and 2 CPUs, every listener on 127.0.0.1, and stopped by its own process id. A scripted agent follows
parallel.md's waves on a toy repo (the user's toy-size edits committed, as in test_program.py), running
train.py on the CPU with a step budget: decisions come from outcomes (statuses, exit codes, and the val_bpb
each commit and seed was given by the test, conftest.scripted_train_py), never from timings or from what the
toy model learns; timeouts are only upper bounds for a hang.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import set_outcome
from test_program import make_repo, set_constants

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
# A real local cluster

@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_cache):
    """A toy repo with parallel.py in it, and the environment every node of the cluster would have."""
    ray_or_skip()
    base = tmp_path_factory.mktemp("parallel")
    repo, env = make_repo(base, tiny_cache, outcome=BASELINE)
    shutil.copy(ROOT / "parallel.py", repo / "parallel.py")   # harness/ (its formats) is there already
    set_constants(repo / "train.py", BASELINE_EDITS)
    git = lambda *args: subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)
    git("add", "-A")
    git("commit", "-qm", "toy baseline with a small matrix lr")
    env = {k: v for k, v in env.items() if not k.startswith("RAY_") and k != "CUDA_VISIBLE_DEVICES"}
    # One timed step a run; its threads are each submit's `--threads 1` (the run's OMP_NUM_THREADS), whatever this
    # environment's OMP_NUM_THREADS is
    env["AUTORESEARCH_STEP_BUDGET"] = "1"
    return repo, env


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
    """Follows parallel.md's waves with the tool's commands, as the README's recipe runs them."""

    def __init__(self, repo, env):
        self.repo, self.env = repo, env

    def P(self, *args, check=True):
        proc = subprocess.run([*uv_command(), "run", "--group", "parallel", "parallel.py", *args], cwd=self.repo,
                              env=self.env, capture_output=True, text=True, timeout=UPPER_BOUND)
        assert not check or proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    def git(self, *args, check=True):
        proc = subprocess.run(["git", *args], cwd=self.repo, env=self.env, capture_output=True, text=True)
        assert not check or proc.returncode == 0, (args, proc.stderr)
        return proc.stdout.strip()

    def candidate(self, description, edits, outcome=None):
        """Edit (and set the outcome the test chose), commit, and go back to the best; the commit's hash is what
        gets submitted."""
        set_constants(self.repo / "train.py", edits)
        if outcome:
            set_outcome(self.repo / "train.py", outcome)
        self.git("commit", "-qam", description)
        sha = self.git("rev-parse", "HEAD")
        self.git("reset", "-q", "--hard", "autoresearch/test-best")   # parallel.md: back to the best by its tag
        return sha

    def rows(self):
        lines = (self.repo / "results.tsv").read_text().splitlines()
        header = lines[0].split("\t")
        return [dict(zip(header, line.split("\t"))) for line in lines[1:]]

    def decide(self, wave, margin):
        """parallel.md step 5: winners of the wave, best first (runs against the same GPU type's control)."""
        rows = [r for r in self.rows() if r["wave"] == str(wave)]
        best = self.git("rev-parse", "--short=7", "HEAD")
        controls = {r["gpu"]: float(r["val_bpb"]) for r in rows if r["description"].startswith("control")
                    and r["status"] != "crash"}
        winners = []
        for r in rows:
            if r["description"].startswith("control") or r["status"] == "crash" or r["gpu"] not in controls:
                continue
            delta = float(r["val_bpb"]) - controls[r["gpu"]]
            if delta <= -margin:
                winners.append((delta, r["run"], r["parent"] == best))
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


def run_id(sha, seed, wave):
    return f"ar-test-{sha[:12]}-s{seed}-w{wave}"   # the night's tag, from the branch autoresearch/test


@pytest.fixture(scope="module")
def night(toy, cluster):
    """A scripted parallel night of three waves on 2 GPUs; the tests below read what it left behind."""
    repo, _ = toy
    agent = Agent(repo, cluster["env"])
    agent.git("checkout", "-qb", "autoresearch/test")
    agent.git("tag", "autoresearch/test-base")   # program.md's setup, step 2
    agent.git("tag", "autoresearch/test-best")
    out = {}

    # Wave 0: the baseline and two noise reruns, 3 runs on 2 GPUs.
    base = agent.git("rev-parse", "HEAD")
    agent.P("submit", "HEAD", "--wave", "0", "--seed", "42", "1", "2", "--description", "baseline", "--threads", "1")
    out["resubmit"] = agent.P("submit", "HEAD", "--wave", "0", "--seed", "42", "--threads", "1").stdout
    out["wave0"] = [run_id(base, s, 0) for s in (42, 1, 2)]
    out["seen"], out["logs0"] = watch(cluster["address"], out["wave0"])
    agent.P("collect")
    out["after_first_collect"] = (repo / "results.tsv").read_text()
    out["second_collect"] = agent.P("collect").stdout
    out["after_second_collect"] = (repo / "results.tsv").read_text()
    margin = max(float(r["val_bpb"]) for r in agent.rows()) - min(float(r["val_bpb"]) for r in agent.rows())
    agent.P("keep", run_id(base, 42, 0))
    out["margin"] = margin

    # Wave 1: control + two independent fixes; the process that submitted them is killed mid-wave.
    a, b = agent.candidate(*FIX_A), agent.candidate(*FIX_B)
    out["a"], out["b"] = a, b
    wave1 = [run_id(base, 42, 1), run_id(a, 42, 1), run_id(b, 42, 1)]
    P = " ".join(["uv", "run", "--group", "parallel", "parallel.py"])
    script = f"{P} submit HEAD --wave 1 --control --threads 1 && {P} submit {a} {b} --wave 1 --threads 1 && {P} wait"
    submitter = subprocess.Popen(["bash", "-c", script], cwd=repo, env=agent.env, start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from ray.job_submission import JobSubmissionClient
    client, deadline = JobSubmissionClient(cluster["address"]), time.time() + UPPER_BOUND
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
    agent.P("collect")
    winners = agent.decide(1, margin)
    out["winners1"] = winners
    assert [w[1] for w in winners] == [run_id(a, 42, 1), run_id(b, 42, 1)], winners
    agent.P("keep", winners[0][1])
    out["stale_keep"] = agent.P("keep", winners[1][1], check=False)
    # Re-apply the stale winner on the new best (parallel.md step 6). A and B set adjacent lines in train.py, and
    # each its own outcome on one line: a conflict, so the same edit by hand, with the outcome B has on top of A.
    picked = subprocess.run(["git", "cherry-pick", b], cwd=repo, env=agent.env, capture_output=True)
    assert picked.returncode != 0, "the cherry-pick of B on A should conflict"
    agent.git("cherry-pick", "--abort")
    set_constants(repo / "train.py", FIX_B[1])
    set_outcome(repo / "train.py", B_ON_A)
    agent.git("commit", "-qam", f"{FIX_B[0]} (re-applied)")
    b2 = agent.git("rev-parse", "HEAD")
    agent.git("reset", "-q", "--hard", "autoresearch/test-best")
    out["b2"] = b2

    # Wave 2: control, the re-applied winner, a crash and a hang (with a short time limit).
    crash, hang = agent.candidate(*CRASH), agent.candidate(*HANG)
    agent.P("submit", "HEAD", "--wave", "2", "--control", "--threads", "1")
    agent.P("submit", b2, crash, "--wave", "2", "--threads", "1")
    agent.P("submit", hang, "--wave", "2", "--threads", "1", "--time-limit", str(HANG_LIMIT))
    agent.P("wait", "--timeout", str(UPPER_BOUND))
    agent.P("collect")
    winners = agent.decide(2, margin)
    out["winners2"] = winners
    for _, run, fresh in winners:
        if fresh:
            agent.P("keep", run)
    # Stop one: the hanging commit again, stopped while it runs, is collected as a crash.
    stopped = run_id(hang, 42, 3)
    agent.P("submit", hang, "--wave", "3", "--threads", "1")
    deadline = time.time() + UPPER_BOUND
    while str(client.get_job_status(stopped)) != "RUNNING":
        assert time.time() < deadline, f"{stopped} never started"
        time.sleep(0.5)
    out["stop"] = agent.P("stop", stopped).stdout
    agent.P("wait", "--timeout", str(UPPER_BOUND))
    out["stopped_status"] = str(client.get_job_status(stopped))
    agent.P("collect")
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
    gpu = {run: re.search(r"^parallel: run .*, CUDA_VISIBLE_DEVICES=(\d+),", log, re.M)[1]
           for run, log in logs.items()}
    for pair in together:
        assert len({gpu[run] for run in pair}) == 2, gpu
    # Three runs of one commit: each in a working directory of its own (Ray would share identical ones).
    dirs = {re.search(r"^parallel: run .* in (\S+), CUDA_VISIBLE_DEVICES", log, re.M)[1] for log in logs.values()}
    assert len(dirs) == 3
    assert all(re.search(r"^parallel: run .*OMP_NUM_THREADS=1$", log, re.M) for log in logs.values())


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


@pytest.mark.ray
def test_killed_submitter_loses_nothing(night):
    assert len(night["killed_with"]) == 3 and "RUNNING" in night["killed_with"].values()
    rows = [r for r in night["agent"].rows() if r["wave"] == "1"]
    assert sorted(r["run"] for r in rows) == sorted(run_id(s, 42, 1) for s in (night["base"], night["a"], night["b"]))
    assert all(r["status"] != "crash" for r in rows)


@pytest.mark.ray
def test_crash_and_hang_become_crash_rows(night):
    rows = {r["run"]: r for r in night["agent"].rows()}
    crash, hang = rows[run_id(night["crash"], 42, 2)], rows[run_id(night["hang"], 42, 2)]
    assert (crash["status"], crash["val_bpb"], crash["memory_gb"]) == ("crash", "0.000000", "0.0")
    assert crash["description"] == f"{CRASH[0]} (exit 1)"
    assert hang["status"] == "crash" and hang["description"] == f"{HANG[0]} (exit 124, killed at the time limit)"


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
    assert [fresh for _, _, fresh in night["winners1"]] == [True, True]
    stale = night["stale_keep"]
    assert stale.returncode == 1 and f"is not the current best {night['a'][:7]}" in stale.stderr
    assert "git cherry-pick" in stale.stderr
    # Wave 2: the re-applied winner is judged against the new control, and on the new best it does not beat
    # it by the margin: it stays discarded (a win over a stale parent is not a win over the new best).
    assert night["winners2"] == []
    b2 = next(r for r in rows if r["run"] == run_id(night["b2"], 42, 2))
    assert b2["parent"] == night["a"][:7] and b2["status"] == "discard"
    control = next(r for r in rows if r["run"] == run_id(night["a"], 42, 2))
    assert control["description"] == "control (wave 2)" and control["status"] == "discard"
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
