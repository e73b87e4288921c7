"""
Many GPUs: run experiments as Ray jobs, one commit per GPU, many at a time (see parallel.md).

    uv run --group parallel parallel.py start-head              # one box: a local Ray head on 127.0.0.1
    uv run --group parallel parallel.py submit COMMIT... --wave N [--seed S] [--control] | submit --retry RUN
    uv run --group parallel parallel.py list | wait | stop RUN | collect | log RUN | keep RUN | report
    uv run --group parallel parallel.py stop-head

The agent stays the scheduler: it decides what to run and what to keep (parallel.md). This tool only
snapshots commits, places each run on one GPU through Ray Jobs, and turns finished runs into results.tsv
rows, each number taken from the harness's own record of the run (evaluations.jsonl). It talks to the
cluster at RAY_ADDRESS (default http://127.0.0.1:8265, where start-head puts it).
Nothing on the single-GPU path (train.py, prepare.py, program.md's loop) imports this file or Ray.
"""

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from harness import evaluations
from harness.formats import PARALLEL_HEADER, parse_summary

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_TEMP_DIR = "/tmp/ray-autoresearch"   # short: Ray's unix socket paths must stay under ~107 characters
TIME_LIMIT = 600                              # seconds: program.md's `timeout 600`, a run over it is a crash
START_TIMEOUT = 7 * 24 * 3600                 # RAY_JOB_START_TIMEOUT_SECONDS: a queued run waits, never fails
AGENT_WAIT = 120                              # seconds a submit waits for a just-started node's job agent
PREFIX = "ar-"                                # submission ids of our runs start with this
HEADER = list(PARALLEL_HEADER)                # results.tsv's columns, then a parallel night's own
HEAD_STATE = "autoresearch-head.json"

# The job's shell command, in a clean environment (no virtualenv of whoever started the node). The GPU's name comes
# from nvidia-smi (Ray sets CUDA_VISIBLE_DEVICES to the physical index); the venv is one per node next to uv's cache,
# so a job never copies ~7 GB of wheels into Ray's temp dir. A node's first runs all start at once, and two uv builds
# of one fresh venv delete each other's files ("failed to remove directory ...: Directory not empty"): the sync that
# `uv run` does first runs alone, under a lock, and the runs after the first find the venv built. Every line
# `parallel: ...` is read back by collect: before `train.py starts` nothing of the experiment ran (a retry may redo it).
ENTRYPOINT = """\
echo "parallel: run {run} on $(hostname) in $PWD, CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}}"
echo "parallel: threads ${{OMP_NUM_THREADS:-}} ({threads_from})"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader -i "${{CUDA_VISIBLE_DEVICES%%,*}}" 2>/dev/null | head -n 1)
echo "parallel: gpu ${{gpu:-none}}"
unset VIRTUAL_ENV
export UV_PROJECT_ENVIRONMENT="${{UV_PROJECT_ENVIRONMENT:-${{XDG_CACHE_HOME:-$HOME/.cache}}/autoresearch-venv}}"
if ! command -v flock >/dev/null; then
  echo "parallel: not started: no flock on $(hostname) (install util-linux)"
  exit 127
fi
mkdir -p "$(dirname "$UV_PROJECT_ENVIRONMENT")"
flock "$UV_PROJECT_ENVIRONMENT.lock" uv run --frozen true
code=$?
if [ $code -ne 0 ]; then
  echo "parallel: not started: building the environment $UV_PROJECT_ENVIRONMENT failed (exit $code)"
  exit $code
fi
echo "parallel: train.py starts"
timeout {limit} uv run --frozen --no-sync train.py
code=$?
if [ -f {records} ]; then echo "parallel: record $(tail -n 1 {records})"; fi
echo "parallel: exit code $code"
exit $code"""
RUN_ID = re.compile(r"^(?P<base>.+-w\d+)(?:-a(?P<attempt>\d+))?$")   # a retry is the same run, attempt 2, 3, ...


class Refusal(Exception):
    """Bad input or state: the message is the one line to print."""


# ---------------------------------------------------------------------------------------------------------------
# Cluster access

def cluster_address():
    return os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def job_client():
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise Refusal("Ray is not installed: run this tool as `uv run --group parallel parallel.py ...`") from None
    for name in list(logging.root.manager.loggerDict):   # Ray's INFO lines would flood the agent's context
        if name.startswith("ray"):
            logging.getLogger(name).setLevel(logging.WARNING)
    address = cluster_address()
    try:
        return JobSubmissionClient(address)
    except (OSError, RuntimeError, ValueError) as e:
        raise Refusal(f"no Ray cluster answers at {address} ({str(e).splitlines()[0]}); start one with "
                      "`parallel.py start-head`, or set RAY_ADDRESS=http://HEAD:8265") from None


def threads_per_run():
    """(threads, why): the CPUs of a GPU node divided by its GPUs, as Ray counts them (the smallest over the
    cluster's GPU nodes, so that no node is oversubscribed), at least 1. A head that has just started may not list
    its node yet: wait for it, as submit_when_ready waits for its job agent."""
    from ray.util.state import list_nodes
    deadline = time.time() + AGENT_WAIT   # an upper bound for a slow start, never a decision
    while True:
        try:
            nodes = list_nodes(address=cluster_address(), filters=[("state", "=", "ALIVE")],
                               raise_on_missing_output=False)
        except Exception as e:   # the state API raises its own kinds; any of them means: no node list
            raise Refusal(f"cannot list the cluster's nodes to size each run's threads ({str(e).splitlines()[0]}); "
                          "pass --threads N (the CPU cores per GPU of a node)") from None
        gpu_nodes = [n.resources_total for n in nodes if n.resources_total.get("GPU")]
        if gpu_nodes:
            cpus, gpus = min(((int(r.get("CPU", 0)), int(r["GPU"])) for r in gpu_nodes), key=lambda c: c[0] / c[1])
            return max(1, cpus // gpus), f"the node's {cpus} CPUs / {gpus} GPUs; --threads to override"
        if nodes or time.time() > deadline:
            raise Refusal(f"no node of the cluster at {cluster_address()} offers a GPU yet; start it with GPUs, or "
                          "pass --threads N (the CPU cores per GPU of the nodes that will run it)")
        time.sleep(2)


def our_jobs(client):
    """This branch's runs, oldest first: a cluster kept from an earlier night also holds that night's runs."""
    branch = current_branch()
    jobs = [j for j in client.list_jobs() if (j.submission_id or "").startswith(PREFIX)
            and (j.metadata or {}).get("branch") == branch]
    return sorted(jobs, key=lambda j: (j.start_time or 0, j.submission_id))


def never_ran(job):
    """A run that failed before its command started (start timeout, runtime env, its node lost)."""
    return str(job.status) == "FAILED" and job.driver_exit_code is None


def is_finished(job):
    return str(job.status) in ("SUCCEEDED", "FAILED", "STOPPED")


def job_log(client, job):
    try:
        return client.get_job_logs(job.submission_id)
    except RuntimeError:   # a job that never got a driver may have no log at all
        return ""


def not_started(job, log):
    """Why a finished run died before train.py started (no result: it may be retried), or None if train.py ran or
    the agent stopped the run (its row says so)."""
    if str(job.status) == "STOPPED" or re.search(r"^parallel: (train\.py starts|exit code \d+)$", log, re.M):
        return None
    said = re.findall(r"^parallel: not started: (.*)$", log, re.M)
    if said:
        return said[-1]
    message = (job.message or "").strip().splitlines()
    message = f": {message[0][:120]}" if message else ""
    if never_ran(job):
        return f"it never started or its node was lost{message}"
    return f"it ended before train.py started, exit {job.driver_exit_code}{message}"


def attempt_of(run):
    """(the run's id without its attempt, the attempt: 1 for the first submission)."""
    found = RUN_ID.match(run)
    return (found["base"], int(found["attempt"] or 1)) if found else (run, 1)


def retried(jobs):
    """The ids of runs that a later attempt of the same run replaces."""
    latest = {}
    for job in jobs:
        base, attempt = attempt_of(job.submission_id)
        latest[base] = max(latest.get(base, 0), attempt)
    return {j.submission_id for j in jobs if attempt_of(j.submission_id)[1] < latest[attempt_of(j.submission_id)[0]]}


# ---------------------------------------------------------------------------------------------------------------
# Git

def git(*args, cwd=None):
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Refusal(f"git {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
    return proc.stdout.strip()


def resolve(commit):
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise Refusal(f"{commit!r} is not a commit in this repository; pass a hash or a ref (git log --oneline)")
    return proc.stdout.strip()


def current_branch():
    return git("rev-parse", "--abbrev-ref", "HEAD")


def parent_of(sha):
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{sha}^"], capture_output=True, text=True)
    return proc.stdout.strip()   # empty for a root commit


def snapshot(sha, run, directory):
    """The commit's files (never the live working tree) plus a file naming the run, so that two runs of one
    commit never share a working directory (Ray reuses one directory for identical contents)."""
    files = Path(directory) / "files"
    files.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", sha], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(files)], input=archive, check=True)
    (files / ".autoresearch-run").write_text(f"{run}\n")
    return files


# ---------------------------------------------------------------------------------------------------------------
# Commands

def cmd_submit(args):
    if args.retry:
        given = (args.commits or args.wave is not None or args.seed != [42] or args.control or args.parent
                 or args.description or args.time_limit != TIME_LIMIT or args.threads or args.env)
        if given:
            raise Refusal("--retry RUN runs that run again as it was first submitted: give no commits, no --wave "
                          "and no other option")
        return retry(job_client(), args.retry)
    if not args.commits or args.wave is None:
        raise Refusal("submit needs COMMIT... --wave N (or --retry RUN); see parallel.md")
    if args.threads is not None and args.threads < 1:
        raise Refusal(f"--threads {args.threads}: give at least 1")
    client = job_client()
    env = {}
    for item in args.env:
        if "=" not in item:
            raise Refusal(f"--env {item!r}: write it as NAME=VALUE")
        name, value = item.split("=", 1)
        env[name] = value
    for name in ("AUTORESEARCH_CACHE", "AUTORESEARCH_DATASET"):
        if os.environ.get(name) and name not in env:
            env[name] = os.environ[name]
    shas = [(resolve(commit), seed) for commit in args.commits for seed in args.seed]   # every commit checked first
    threads, threads_from = (args.threads, "--threads") if args.threads else threads_per_run()
    branch = current_branch()
    night = re.sub(r"[^A-Za-z0-9_.]+", "_", branch.split("/")[-1])   # the run tag: two nights never share an id
    existing = {}
    for job in client.list_jobs():
        if (job.submission_id or "").startswith(PREFIX):
            existing.setdefault(attempt_of(job.submission_id)[0], []).append(job)
    for sha, seed in shas:
        parent = resolve(args.parent) if args.parent else parent_of(sha)
        run = f"{PREFIX}{night}-{sha[:12]}-s{seed}-w{args.wave}"
        if run in existing:
            job = max(existing[run], key=lambda j: attempt_of(j.submission_id)[1])
            why = not_started(job, job_log(client, job)) if is_finished(job) else None
            hint = f"; it did not start ({why}): `parallel.py submit --retry {job.submission_id}`" if why else ""
            print(f"{job.submission_id}: already submitted ({job.status}), nothing to do{hint}")
            continue
        description = "control" if args.control else (args.description or git("log", "-1", "--format=%s", sha))
        metadata = {"branch": branch, "commit": sha, "parent": parent, "wave": str(args.wave), "seed": str(seed),
                    "description": description, "control": "1" if args.control else "",
                    "time_limit": str(args.time_limit), "threads_from": threads_from}
        env_vars = {"SEED": str(seed), "OMP_NUM_THREADS": str(threads), "AUTORESEARCH_COMMIT": sha, **env}
        launch(client, run, metadata, env_vars)
        print(f"{run}: submitted {sha[:7]} {description!r} (wave {args.wave}, seed {seed}, {threads} threads)")


def launch(client, run, metadata, env_vars):
    """Submit one run: a snapshot of its commit, one GPU, the metadata collect reads back. AUTORESEARCH_COMMIT names
    the commit in the harness's record (the snapshot has no .git)."""
    sha = metadata["commit"]
    git("update-ref", f"refs/parallel/{run}", sha)   # the commit stays reachable after the agent's resets
    with tempfile.TemporaryDirectory(prefix="autoresearch-run-") as tmp:
        files = snapshot(sha, run, tmp)
        submit_when_ready(
            client,
            entrypoint=ENTRYPOINT.format(run=run, limit=metadata["time_limit"], threads_from=metadata["threads_from"],
                                         records=evaluations.RECORDS_FILE),
            submission_id=run,
            entrypoint_num_gpus=1,   # without it Ray sets no CUDA_VISIBLE_DEVICES and every run lands on GPU 0
            runtime_env={"working_dir": str(files), "env_vars": env_vars},
            metadata=metadata)


def retry(client, run):
    """Run again, as a new attempt, a run that died before train.py started; never a run whose train.py ran."""
    jobs = {j.submission_id: j for j in our_jobs(client)}
    if run not in jobs:
        raise Refusal(f"{run}: no such run of this branch on the cluster (see parallel.py list)")
    job = jobs[run]
    base, attempt = attempt_of(run)
    later = sorted((attempt_of(j)[1], j) for j in jobs if attempt_of(j)[0] == base and attempt_of(j)[1] > attempt)
    if later:
        raise Refusal(f"{run} was already retried as {later[-1][1]}; retry that one if it did not start either")
    if not is_finished(job):
        raise Refusal(f"{run} is {job.status}: wait for it to finish (parallel.py wait {run})")
    log = job_log(client, job)
    why = not_started(job, log)
    if why is None:
        code = parse_log(log)[0]
        code = job.driver_exit_code if code is None else code
        how = "was stopped" if str(job.status) == "STOPPED" else f"ran and exited {code}"
        raise Refusal(f"{run}: train.py {how}: that is the experiment's result, never retried (a crash is fixed in "
                      "a new commit, submitted in a later wave)")
    new = f"{base}-a{attempt + 1}"
    metadata = {**(job.metadata or {}), "retry_of": run}
    metadata.setdefault("time_limit", str(TIME_LIMIT))
    metadata.setdefault("threads_from", "as first submitted")
    launch(client, new, metadata, dict((job.runtime_env or {}).get("env_vars") or {}))
    print(f"{new}: submitted again ({run} did not start: {why})")


def submit_when_ready(client, **job):
    """
    client.submit_job, waiting for the node's job agent: a head that has just started answers on its dashboard
    before its agent is up, and then refuses every job with "No available agent" (seen under load on 2 cores).
    """
    deadline = time.time() + AGENT_WAIT   # an upper bound for a slow start, never a decision
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def cmd_list(args):
    client = job_client()
    jobs = our_jobs(client)
    collected = collected_runs(Path(args.results))
    replaced = retried(jobs)
    counts = {}
    for job in jobs:
        meta = job.metadata or {}
        state = str(job.status)
        if job.submission_id in replaced:
            state = "retried"
        elif job.submission_id in collected:
            state = "collected"
        elif is_finished(job):
            failed = str(job.status) == "FAILED" and not_started(job, job_log(client, job))
            state = "not started" if failed else "finished"
        counts[state] = counts.get(state, 0) + 1
        print(f"{job.submission_id}  {state:<11}  wave {meta.get('wave', '?'):>3}  {meta.get('description', '')}")
    print(", ".join(f"{n} {state}" for state, n in counts.items()) or "no runs on this cluster")


def cmd_wait(args):
    """Block until the given runs (default: all of ours) are finished; --timeout is only an upper bound."""
    client = job_client()
    deadline = time.time() + args.timeout if args.timeout else None
    while True:
        jobs = [j for j in our_jobs(client) if not args.runs or j.submission_id in args.runs]
        missing = set(args.runs) - {j.submission_id for j in jobs}
        if missing:
            raise Refusal(f"no such run on this cluster: {', '.join(sorted(missing))} (see parallel.py list)")
        waiting = [j.submission_id for j in jobs if not is_finished(j)]
        if not waiting:
            print(f"{len(jobs)} runs finished")
            return
        if deadline and time.time() > deadline:
            raise Refusal(f"still running after {args.timeout} s: {', '.join(waiting)}")
        time.sleep(args.poll)


def cmd_stop(args):
    client = job_client()
    for run in args.runs:
        try:
            client.stop_job(run)
        except RuntimeError as e:
            raise Refusal(f"cannot stop {run}: {str(e).splitlines()[0]} (see parallel.py list)") from None
        print(f"{run}: stopped (its whole process tree); `collect` records it as a crash")


def parse_log(log):
    """(exit code, summary dict, gpu) from a run's log."""
    code = re.findall(r"^parallel: exit code (\d+)$", log, re.M)
    summary = parse_summary(log)
    gpu = re.findall(r"^parallel: gpu (.+)$", log, re.M)
    gpu = gpu[-1].strip() if gpu else "none"
    if gpu == "none":   # no nvidia-smi: take what train.py found (`device: cpu (...)` on a CPU box)
        device = re.findall(r"^device: (\w+)(?: \(([^,)]+))?", log, re.M)
        gpu = (device[-1][1] if device and device[-1][0] == "cuda" else device[-1][0]) if device else "unknown"
    return (int(code[-1]) if code else None), summary, gpu


def stamp(ms):
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") if ms else ""


def read_results(path):
    """Rows of a parallel results.tsv as dicts ([] if the file does not exist)."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    if lines[0].split("\t") != HEADER:
        raise Refusal(f"{path} line 1: header {lines[0]!r} is not a parallel night's; it must be "
                      f"{chr(9).join(HEADER)!r} (a single-GPU results.tsv stays separate: use another --results)")
    rows = [dict(zip(HEADER, line.split("\t"))) for line in lines[1:] if line.strip()]
    return rows


def collected_runs(path):
    return {row["run"] for row in read_results(path)}


def write_results(path, rows):
    """All rows at once, through a temporary file: a crash never leaves half a results.tsv."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\t".join(HEADER) + "\n" + "".join("\t".join(r[k] for k in HEADER) + "\n" for r in rows))
    os.replace(tmp, path)


def cmd_collect(args):
    """Append one row per finished, not yet collected run; running it twice adds nothing. A run that died before
    train.py started gets no row (it is no result): it is named, to be retried."""
    client = job_client()
    path = Path(args.results)
    rows = read_results(path)
    done = {row["run"] for row in rows}
    records_path = path.with_name(evaluations.RECORDS_FILE)
    kept_records = {r["run"] for r in evaluations.read(records_path)[0] or [] if r.get("run")}
    reference = baseline_reference(rows, records_path)
    jobs = our_jobs(client)
    replaced = retried(jobs)
    jobs = [j for j in jobs if is_finished(j) and j.submission_id not in done | replaced]
    new = []
    for job in sorted(jobs, key=lambda j: (int((j.metadata or {}).get("wave", 0)), j.start_time or 0)):
        log = job_log(client, job)
        why = not_started(job, log)
        if why:
            print(f"{job.submission_id}: not started ({why}); no row: it is no result. Run it again with "
                  f"`uv run --group parallel parallel.py submit --retry {job.submission_id}`")
            continue
        row, record = result_row(job, log, rows + new, reference)
        if record is not None and job.submission_id not in kept_records:
            keep_record(records_path, record, job.submission_id)
        new.append(row)
    write_results(path, rows + new)
    for row in new:
        print("\t".join(row[k] for k in ("run", "val_bpb", "status", "gpu", "description")))
    print(f"{len(new)} new rows in {path}")


def result_row(job, log, rows, reference):
    """(the run's results.tsv row, the harness's record that backs its val_bpb, or None for a crash). A crash row
    keeps the experiment's description and says why in parentheses."""
    meta = job.metadata or {}
    sha, seed = meta.get("commit", ""), meta.get("seed", "42")
    code, summary, gpu = parse_log(log)
    code = job.driver_exit_code if code is None else code
    description = meta.get("description", "")
    if meta.get("control"):
        description = f"control (wave {meta.get('wave')}): {best_description(sha, rows)}"
    if seed != "42":
        description += f", seed {seed}"
    if meta.get("control") or seed != "42":
        description += " (noise)"   # a rerun of a commit that has its own row (program.md's "Noise")
    record = None
    if str(job.status) == "STOPPED":
        why = "stopped"
    elif code != 0:
        why = f"exit {code}{', killed at the time limit' if code == 124 else ''}"
    elif "val_bpb" not in summary or "peak_vram_mb" not in summary:
        why = "exit 0 without a summary block"
    else:
        record, why = checked_record(log, sha, summary["val_bpb"])
        why = why or changed(record, gpu, reference)
    if why:
        record = None
        description += f" ({why})"
    else:
        reference.setdefault("dataset", record.get("dataset"))   # the baseline's: the first row with a value
        reference.setdefault(("attention", gpu), record.get("attention"))
    row = {"commit": sha[:7], "val_bpb": f"{record['val_bpb']:.6f}" if record else "0.000000",
           "memory_gb": f"{float(summary['peak_vram_mb']) / 1024:.1f}" if record else "0.0",
           "status": "discard" if record else "crash", "description": description.replace("\t", " "),
           "gpu": gpu, "parent": meta.get("parent", "")[:7], "wave": meta.get("wave", ""),
           "run": job.submission_id, "started": stamp(job.start_time), "ended": stamp(job.end_time)}
    return row, record


def best_description(sha, rows):
    """What a control runs: the description of its commit's kept row (not a rerun's), else the commit's subject."""
    kept = [r["description"] for r in rows if r["commit"] == sha[:7] and r["status"] == "keep"
            and not r["description"].endswith("(noise)")]
    return kept[-1] if kept else git("log", "-1", "--format=%s", sha)


def train_sha256(sha):
    proc = subprocess.run(["git", "show", f"{sha}:train.py"], capture_output=True)
    return hashlib.sha256(proc.stdout).hexdigest() if proc.returncode == 0 else None


def checked_record(log, sha, printed):
    """(the harness's record of the run, None) if it backs the val_bpb that train.py printed, else (None, why not):
    program.md's `analysis.py --check`, for a run whose record came back in its log (`parallel: record {...}`)."""
    lines = re.findall(r"^parallel: record (.*)$", log, re.M)
    if not lines:
        return None, "not backed: the harness wrote no record of the run"
    try:
        record = json.loads(lines[-1])
        measured = f"{float(record['val_bpb']):.6f}"
    except (ValueError, TypeError, KeyError):
        return None, "not backed: its record is not one the harness writes"
    if record.get("commit") != sha:
        return None, f"not backed: the record is of commit {str(record.get('commit'))[:7]}, not {sha[:7]}"
    if record.get("train_sha256") != train_sha256(sha):
        return None, f"not backed: the train.py that ran is not {sha[:7]}'s"
    try:
        agrees = f"{float(printed):.6f}" == measured
    except ValueError:
        agrees = False
    if not agrees:
        return None, f"not backed: train.py printed val_bpb {printed}, the harness measured {measured}"
    why = evaluations.why_not_backed(dict(record, dirty=False))   # dirty: the train.py that ran is the commit's
    return (None, f"not backed: {why}") if why else (record, None)


def changed(record, gpu, reference):
    """program.md's checks before any keep: the dataset is the baseline's, and the attention path the baseline's
    (on another GPU type FA3 may load from another build: there, the first run's on that type)."""
    dataset, attention = record.get("dataset"), record.get("attention")
    if reference.get("dataset", dataset) != dataset:
        return f"dataset changed to {dataset}"
    if reference.get(("attention", gpu), attention) != attention:
        return f"attention changed to {attention}"
    return None


def baseline_reference(rows, records_path):
    """The dataset of the night's first run with a value, and the attention path of the first on each GPU type, from
    the records that collect kept beside results.tsv."""
    records, _ = evaluations.read(records_path)
    by_run = {r["run"]: r for r in records or [] if r.get("run")}
    reference = {}
    for row in rows:
        record = by_run.get(row["run"])
        if record and row["status"] != "crash":
            reference.setdefault("dataset", record.get("dataset"))
            reference.setdefault(("attention", row["gpu"]), record.get("attention"))
    return reference


def keep_record(path, record, run):
    """A run's checked record in evaluations.jsonl beside results.tsv, as a single-GPU night has it, so that the
    morning report backs these rows too; `dirty` is false because collect found the train.py that ran to be its
    commit's (the harness, outside git, could not say)."""
    line = json.dumps(dict(record, run=run, dirty=False), sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)


def cmd_log(args):
    """A run's last lines, as program.md's `tail -n 50 run.log` (a progress line rewritten with \\r: its last state)."""
    if args.lines < 1:
        raise Refusal(f"-n {args.lines}: give at least 1 line")
    client = job_client()
    try:
        text = client.get_job_logs(args.run)
    except RuntimeError:
        raise Refusal(f"no such run on this cluster: {args.run} (see parallel.py list)") from None
    lines = [line.rsplit("\r", 1)[-1] for line in text.rstrip("\n").split("\n")]
    print("\n".join(lines[-args.lines:]))


def cmd_keep(args):
    """The ratchet step: fast-forward the branch to a collected run whose parent is the current best."""
    path = Path(args.results)
    rows = read_results(path)
    row = next((r for r in rows if r["run"] == args.run), None)
    if row is None:
        raise Refusal(f"{args.run} is not in {path}: `parallel.py collect` it first")
    if row["status"] != "discard":
        raise Refusal(f"{args.run} has status {row['status']}: only a finished run that is not yet kept can be kept")
    sha = resolve(f"refs/parallel/{args.run}")
    head = resolve("HEAD")
    parent = parent_of(sha)
    best_tag = f"{current_branch()}-best"   # program.md's tag of the last kept commit: discards reset to it
    if sha == head:   # the baseline (or a control): it already is the best, only its row changes
        git("tag", "-f", best_tag, sha)
        row["status"] = "keep"
        write_results(path, rows)
        print(f"{args.run}: kept, the branch and {best_tag} stay at {sha[:7]}")
        return
    if parent != head:
        raise Refusal(f"{args.run}: its parent {parent[:7]} is not the current best {head[:7]}; re-apply it with "
                      f"`git cherry-pick {sha[:7]}` and submit the new commit in the next wave")
    if subprocess.run(["git", "diff", "--quiet", "HEAD"]).returncode != 0:
        raise Refusal("the working tree has uncommitted changes: commit or discard them before a keep")
    git("merge", "--ff-only", "--quiet", sha)
    git("tag", "-f", best_tag, sha)
    row["status"] = "keep"
    write_results(path, rows)
    print(f"{args.run}: kept, the branch and {best_tag} are at {sha[:7]}")


def cmd_report(args):
    """Waves at a glance: runs, crashes, keeps, GPUs busy, experiments per hour; results by GPU type only."""
    rows = read_results(Path(args.results))
    if not rows:
        raise Refusal(f"{args.results}: no rows yet; `parallel.py collect` after a wave finishes")
    parse = lambda s: datetime.strptime(s, "%Y-%m-%dT%H:%M:%S").timestamp()
    print("wave  runs  crash  keep  hours  GPUs busy  runs/hour")
    waves = sorted({int(r["wave"]) for r in rows})
    for wave in waves + [None]:
        part = [r for r in rows if wave is None or int(r["wave"]) == wave]
        timed = [(parse(r["started"]), parse(r["ended"])) for r in part if r["started"] and r["ended"]]
        span = (max(e for _, e in timed) - min(s for s, _ in timed)) if timed else 0
        busy = sum(e - s for s, e in timed) / span if span else 0
        rate = len(part) / (span / 3600) if span else 0
        label = "all" if wave is None else str(wave)
        print(f"{label:>4}  {len(part):>4}  {sum(r['status'] == 'crash' for r in part):>5}  "
              f"{sum(r['status'] == 'keep' for r in part):>4}  {span / 3600:>5.2f}  {busy:>9.1f}  {rate:>9.1f}")
    for gpu in sorted({r["gpu"] for r in rows}):   # val_bpb never compares across GPU types
        ok = [r for r in rows if r["gpu"] == gpu and r["status"] != "crash"]
        if ok:
            best = min(ok, key=lambda r: float(r["val_bpb"]))
            print(f"{gpu}: {len(ok)} runs, best {best['val_bpb']} ({best['commit']}, {best['description']})")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_start_head(args):
    """A Ray head for one box, every listener on 127.0.0.1, in a session of its own that stop-head ends."""
    temp_dir = Path(args.temp_dir).resolve()
    state = temp_dir / HEAD_STATE
    if state.exists() and pid_alive(json.loads(state.read_text())["pid"]):
        raise Refusal(f"a head is already running from {state}: stop it with `parallel.py stop-head`")
    ray = shutil.which("ray", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if ray is None:
        raise Refusal("Ray is not installed: run this tool as `uv run --group parallel parallel.py ...`")
    temp_dir.mkdir(parents=True, exist_ok=True)
    command = [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(args.port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(args.dashboard_port),
               "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    if args.num_gpus is not None:
        command += ["--num-gpus", str(args.num_gpus)]
    if args.num_cpus is not None:
        command += ["--num-cpus", str(args.num_cpus)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",   # node address = loopback: nothing listens outside
           "RAY_JOB_START_TIMEOUT_SECONDS": os.environ.get("RAY_JOB_START_TIMEOUT_SECONDS", str(START_TIMEOUT))}
    env.pop("RAY_ADDRESS", None)
    log = open(temp_dir / "autoresearch-head.log", "ab")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{args.dashboard_port}"
    state.write_text(json.dumps({"pid": proc.pid, "address": address}))
    deadline = time.time() + args.timeout   # an upper bound for a slow start, never a decision
    while time.time() < deadline:
        if proc.poll() is not None:
            state.unlink()
            raise Refusal(f"ray start exited with code {proc.returncode}; see {temp_dir / 'autoresearch-head.log'}")
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
            break
        except OSError:
            time.sleep(1)
    else:
        raise Refusal(f"the head did not answer within {args.timeout} s; see {temp_dir / 'autoresearch-head.log'}")
    print(f"Ray head running (pid {proc.pid}), dashboard and jobs API at {address}")
    print(f"export RAY_ADDRESS={address}")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive, and not ours to stop
        return True
    return True


def process_tree(pid):
    """pid and every process below it (from `ps`: Ray's own psutil is not importable outside Ray)."""
    table = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children = {}
    for child, parent in zip(table[::2], table[1::2]):
        children.setdefault(int(parent), []).append(int(child))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return [p for p in tree if pid_alive(p)]


def cmd_stop_head(args):
    """Stop the head that start-head started, and only it (never `ray stop`: that stops every Ray on the box)."""
    state = Path(args.temp_dir).resolve() / HEAD_STATE
    if not state.exists():
        raise Refusal(f"no head started by this tool in {state.parent} (pass the --temp-dir given to start-head)")
    pid = json.loads(state.read_text())["pid"]
    tree = process_tree(pid) if pid_alive(pid) else []
    if tree:
        os.kill(pid, signal.SIGTERM)   # Ray drains and stops its own processes
        deadline = time.time() + args.timeout
        while time.time() < deadline and any(pid_alive(p) for p in tree):
            time.sleep(0.5)
        for p in tree:   # whatever did not stop by itself
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)
    state.unlink()
    print(f"stopped the head (pid {pid}) and {max(len(tree) - 1, 0)} processes under it")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run autoresearch experiments as Ray jobs (see parallel.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    results = dict(default="results.tsv", help="the parallel night's results file (default results.tsv)")

    p = sub.add_parser("start-head", help="start a Ray head on this box, bound to 127.0.0.1")
    p.add_argument("--num-gpus", type=int, help="GPUs to offer (default: all that Ray finds)")
    p.add_argument("--num-cpus", type=int, help="CPUs to offer (default: all)")
    p.add_argument("--port", type=int, default=6379, help="the head's GCS port (default 6379)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and jobs API (default 8265)")
    p.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR, help=f"Ray's temp dir (default {DEFAULT_TEMP_DIR})")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for the head to answer")
    p.set_defaults(func=cmd_start_head)

    p = sub.add_parser("stop-head", help="stop the head that start-head started, and only it")
    p.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR)
    p.add_argument("--timeout", type=float, default=60, help="seconds to let Ray drain before killing")
    p.set_defaults(func=cmd_stop_head)

    p = sub.add_parser("submit", help="submit commits as runs, one GPU each; or retry a run that did not start")
    p.add_argument("commits", nargs="*", help="commits to run (hashes or refs); each runs as a snapshot")
    p.add_argument("--wave", type=int, help="the wave number: part of the run's id")
    p.add_argument("--retry", metavar="RUN", help="run again, as a new attempt, a run that died before train.py "
                   "started (collect names it); never one whose train.py ran")
    p.add_argument("--seed", type=int, nargs="+", default=[42],
                   help="SEED for train.py (default 42, train.py's own); several seeds submit one run each")
    p.add_argument("--control", action="store_true", help="this run is the wave's control (the current best)")
    p.add_argument("--parent", help="the commit this one was made from (default: its git parent)")
    p.add_argument("--description", help="the row's description (default: the commit's subject)")
    p.add_argument("--time-limit", type=int, default=TIME_LIMIT, help=f"seconds (default {TIME_LIMIT})")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the run (default: a node's CPUs / its GPUs)")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the run's environment (repeatable)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("list", help="our runs: pending, running, finished, collected")
    p.add_argument("--results", **results)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("wait", help="wait until runs finish (default: all)")
    p.add_argument("runs", nargs="*")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (an upper bound)")
    p.add_argument("--poll", type=float, default=5, help="seconds between checks")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("stop", help="stop runs (their whole process trees)")
    p.add_argument("runs", nargs="+")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("collect", help="append finished runs to results.tsv (twice adds nothing)")
    p.add_argument("--results", **results)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("log", help="a run's last lines: its summary block, the harness's record, its exit code")
    p.add_argument("run")
    p.add_argument("-n", "--lines", type=int, default=50, help="how many (default 50)")
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("keep", help="keep a run: fast-forward the branch to it, mark its row keep")
    p.add_argument("run")
    p.add_argument("--results", **results)
    p.set_defaults(func=cmd_keep)

    p = sub.add_parser("report", help="waves, GPUs busy, experiments per hour, best per GPU type")
    p.add_argument("--results", **results)
    p.set_defaults(func=cmd_report)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except Refusal as e:
        print(f"parallel.py: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
