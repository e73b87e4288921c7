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
LAST_RUN_FILE = "last_run.pt"   # beside it: the model the last evaluation scored, for `uv run prepare.py --verify`
FROZEN_CONSTANTS = ("MAX_SEQ_LEN", "EVAL_TOKENS", "VOCAB_SIZE", "TIME_BUDGET")   # prepare.py's, as its source says
BUDGET_NAMES = ("TIME_BUDGET", "STEP_BUDGET", "UNTIMED_STEPS")   # train.py takes these from prepare.py, never sets them
# Seconds from the process start to the evaluation allowed beyond TIME_BUDGET: start-up, the compile warm-up (26 s
# on the reference's H100), batch fitting and a first FA3 download. A run that took longer trained past its budget.
BUDGET_ALLOWANCE = 180
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
                    commit=None, dirty=None, smoke=bool(os.environ.get(SMOKE_OF)), own_budget=_assigned(source))
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


def _assigned(source, names=BUDGET_NAMES):
    """The budget's names that train.py assigns at its top level (shadowing prepare.py's), e.g. UNTIMED_STEPS = 12."""
    try:
        tree = ast.parse(source or b"")
    except (SyntaxError, ValueError):
        return []
    targets = [t for node in tree.body if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
               for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
    return sorted({getattr(t, "id", None) or getattr(t, "attr", None) for t in targets} & set(names))


def over_budget(record):
    """Why a run trained on more than the fixed budget (its constants changed, more steps or more time than they
    allow), or None. Records from before the budget was recorded pass."""
    budget = record.get("budget")
    if not budget:
        return None
    frozen = budget.get("frozen") or {}
    changed = [f"{k} = {budget.get(k)}" for k in ("STEP_BUDGET", "UNTIMED_STEPS") if budget.get(k) != frozen.get(k)]
    changed += [f"train.py sets {name}" for name in record.get("own_budget") or []]
    if changed:
        return f"over the budget: its constants changed ({', '.join(changed)})"
    if frozen.get("STEP_BUDGET"):
        if budget["timed_steps"] > frozen["STEP_BUDGET"]:
            return f"over the budget: {budget['timed_steps']} timed steps of {frozen['STEP_BUDGET']}"
        return None
    limit = (record.get("frozen_constants") or {}).get("TIME_BUDGET", 300) + BUDGET_ALLOWANCE
    if budget["wall_seconds"] > limit:
        return f"over the budget: {budget['wall_seconds']:.0f}s from start to evaluation, more than {limit}s"
    return None


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


def write(path, prepare_py, run, constants, budget, device, **facts):
    """The record of an evaluation, appended to `path` and returned: the run's identity, the constants as used and
    as prepare.py's source defines them, the budget as the run used it, what it scored, on what."""
    import torch
    frozen = frozen_constants(prepare_py)
    budget["frozen"].update(frozen_constants(prepare_py, ("UNTIMED_STEPS",)))
    record = dict(run, **facts, constants=constants, frozen_constants=frozen, constants_frozen=constants == frozen,
                  budget=budget, gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=str(torch.__version__))
    return append(path, record)


def save_last_run(path, model, record):
    """The model an evaluation scored (weights and GPTConfig), its train.py and its record, replacing the last
    run's: what `uv run prepare.py --verify` scores again. Nothing to save without a train.py (a test in-process)."""
    import dataclasses
    import torch
    from harness.errors import HarnessError
    from harness.records import atomic_write
    try:
        source = Path(record["train_py"]).read_text()
    except (OSError, TypeError, KeyError):
        return
    inner = getattr(model, "_orig_mod", model)   # torch.compile's wrapper
    config = getattr(inner, "config", None)
    saved = dict(record=json.loads(json.dumps(record)),   # plain types only: --verify loads it with weights_only
                 train_py=source, weights={k: v.detach().cpu() for k, v in inner.state_dict().items()},
                 config=dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None)
    try:
        atomic_write(path, lambda tmp: torch.save(saved, tmp))
    except (OSError, HarnessError) as e:
        print(f"note: {path} not saved ({e}): `uv run prepare.py --verify` cannot check this run")


def append(path, record):
    """One line, appended in one write (O_APPEND: lines of runs that finish together never interleave)."""
    record = dict(record, time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


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
    return over_budget(record)


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
