"""
The harness's own record of every evaluation: each time evaluate_bpb finishes, one JSON line appended to
evaluations.jsonl in the directory the run started in (the repo's root, beside results.tsv; untracked and
git-ignored, so it survives `git reset --hard` like results.tsv). results.tsv is typed by the agent; this file is
written by the harness, so the morning report and the keep guard check each row against it.
"""

import ast
import datetime
import hashlib
import json
import os
import subprocess
from pathlib import Path

RECORDS_FILE = "evaluations.jsonl"
FROZEN_CONSTANTS = ("MAX_SEQ_LEN", "EVAL_TOKENS", "VOCAB_SIZE", "TIME_BUDGET")   # prepare.py's, as its source says
SMOKE_OF = "AUTORESEARCH_SMOKE_OF"   # set by the smoke run: the train.py its toy-size copy was made from


def _git(*args, cwd):
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def run_identity(script):
    """What a run is, taken when the harness is imported (before training): the train.py that runs (for a smoke
    run the one its copy was made from), its sha256, HEAD of its repository, and whether train.py differed from
    HEAD's. A run outside git (a parallel job runs a `git archive` of its commit) takes the commit from
    AUTORESEARCH_COMMIT; whether the file matches it is then for the reader to check by train_sha256."""
    script = Path(os.environ.get(SMOKE_OF) or script).resolve()
    try:
        source = script.read_bytes()
    except OSError:
        source = None
    identity = dict(train_py=str(script), train_sha256=source and hashlib.sha256(source).hexdigest(),
                    commit=None, dirty=None, smoke=bool(os.environ.get(SMOKE_OF)))
    head = _git("rev-parse", "HEAD", cwd=script.parent)
    if head is None:
        identity["commit"] = os.environ.get("AUTORESEARCH_COMMIT") or None
        return identity
    identity["commit"] = head.decode().strip()
    top = _git("rev-parse", "--show-toplevel", cwd=script.parent)
    relative = script.relative_to(Path(top.decode().strip()).resolve()).as_posix() if top else script.name
    committed = _git("show", f"HEAD:{relative}", cwd=script.parent)
    identity["dirty"] = committed != source
    return identity


def frozen_constants(prepare_py, names=FROZEN_CONSTANTS):
    """The values of prepare.py's constants as its source file defines them (`NAME = <arithmetic>`), whatever a
    process later assigns to the module's attributes."""
    values = {}
    for node in ast.parse(Path(prepare_py).read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and getattr(node.targets[0], "id", None) in names:
            values[node.targets[0].id] = _arithmetic(node.value)
    return values


def _arithmetic(node):
    """An integer expression of literals and + - * // ** (EVAL_TOKENS = 40 * 524288), evaluated without eval."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.FloorDiv: lambda a, b: a // b, ast.Pow: lambda a, b: a ** b}
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
        return ops[type(node.op)](_arithmetic(node.left), _arithmetic(node.right))
    return None


def append(path, record):
    """One line, appended in one write (O_APPEND: lines of runs that finish together never interleave)."""
    line = (json.dumps(dict(record, time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
                       sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path):
    """The records of a file, oldest first, and how many of its lines were not records."""
    records, bad = [], 0
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None, 0
    for line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("val_bpb"), (int, float)):
                raise ValueError
            records.append(record)
        except ValueError:
            bad += line.strip() != ""
    return records, bad


def why_not_backed(record):
    """Why a record of the right commit and value still backs nothing, or None."""
    if record.get("smoke"):
        return "a smoke run at toy size"
    if record.get("dirty") is not False:
        return "a run of a dirty tree (train.py differed from its commit)" if record.get("dirty") else \
            "a run whose train.py was not checked against its commit"
    if not record.get("constants_frozen"):
        changed = {k: v for k, v in (record.get("constants") or {}).items()
                   if (record.get("frozen_constants") or {}).get(k, v) != v}
        changed = ", ".join(f"{k}={v}" for k, v in changed.items())
        return f"evaluation constants that were not the frozen ones ({changed})"
    return None


def backing(commit, val_bpb, records):
    """(the record that backs a results.tsv row, None) or (None, why none does). A row is backed when a record of
    its commit (the row's short hash a prefix of the record's) has its val_bpb to the 6 printed decimals, from a
    clean tree and the frozen constants."""
    mine = [r for r in records if commit and (r.get("commit") or "").startswith(commit)]
    if not mine:
        return None, "no record for that commit (typed by hand, or forged)"
    same = [r for r in mine if f"{r['val_bpb']:.6f}" == f"{val_bpb:.6f}"]
    if not same:
        measured = ", ".join(sorted({f"{r['val_bpb']:.6f}" for r in mine}))
        return None, f"the harness measured {measured} for that commit (mistyped or forged)"
    whys = [why_not_backed(r) for r in same]
    if None in whys:
        return same[whys.index(None)], None
    return None, whys[0]
