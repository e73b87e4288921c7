"""
program.md followed literally by a scripted agent, at toy size on the CPU.

The agent takes its shell commands from program.md's own code blocks (so the test
breaks when the document and the code drift apart), in a temporary copy of the repo
whose one-time user edits shrink the model and the harness. Every run trains the toy
model for real (step-budgeted: AUTORESEARCH_STEP_BUDGET), but its val_bpb is the one the
test chose for that commit and seed (conftest.scripted_train_py: each experiment's commit
sets its own `SCRIPTED_NATS` beside its real edit), printed through the real evaluation
and summary block: every keep and discard below is the test's, on any machine.

One night, in three sessions. The first agent sets up, runs the baseline and the noise
reruns, a maybe-noise experiment (rerun, not confirmed: discarded), an improving experiment
and an edit that changes nothing (not run), then stops.
A fresh agent with no memory resumes from the notes: three crashes in a row (an error, reset
twice as after a compaction; a hang; a kill) and the check of the last kept commit that
follows them. A third agent starts the next night on the same branch. Another short night
has a baseline that crashes.

Every run of train.py costs a subprocess and a torch import: the night has the fewest runs
that take each path of program.md once, and the crashes happen before torch is imported.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import scripted_train_py, set_outcome
from harness.formats import RESULTS_HEADER

ROOT = Path(__file__).resolve().parent.parent
TAG = "test"
STEP_BUDGET = 3          # timed steps per run
HANG_LIMIT = 1           # program.md's `timeout 600` for the hanging run only (it sleeps an hour: any limit kills
                         # it); every other run keeps 600, a bound that decides nothing
FROZEN = ["prepare.py", "harness", "pyproject.toml", "uv.lock"]   # program.md's guard

# The user's one-time edits before a night on a tiny machine: harness constants and model size.
HARNESS_EDITS = {"MAX_SEQ_LEN": "64", "EVAL_TOKENS": "64 * 16"}
NIGHT_WARMUP = {"UNTIMED_STEPS": "4"}   # the night's: no compile to warm up on a CPU, 4 warm-up steps and not 11
TOY_EDITS = {"DEPTH": "2", "ASPECT_RATIO": "16", "HEAD_DIM": "32", "DEVICE_BATCH_SIZE": "2",
             "TOTAL_BATCH_SIZE": "2 * 64", "UNEMBEDDING_LR": "0.0003"}
# Outcomes, in nats above uniform per SEED (val_bpb is linear in them): the baseline's three runs give B = 0.32 and
# M = 0.04; every decision below is at least M / 4 from its threshold
BASELINE = {42: 0.30, 1: 0.32, 2: 0.34}
# The agent's experiments: (description, edits to train.py: `NAME = ...` lines, or a line of source ending in \n,
# and the outcome its commit sets, if any)
IMPROVE = ("unembedding lr 0.0003 -> 0.004", {"UNEMBEDDING_LR": "0.004"}, {42: 0.20})   # delta -0.12 <= -M: kept
# In the maybe-noise band (-M < delta = -0.03 <= -M/2), and not confirmed by SEED=1 (0.31 > B - M/2 = 0.30): rerun
# row first, then discard
NEAR = ("window pattern SSSL -> SL", {"WINDOW_PATTERN": '"SL"'}, {42: 0.29, 1: 0.31})
# Changes that only remove code, after the check (B = A = 0.20): the first within the noise of the last gain and kept
# (B = 0.23); the second within the noise of B (delta 0.02 < M) but over A + M = 0.24: discarded, so that a chain of
# removals cannot drift the kept commit worse than the last gain by more than M
REMOVE = ("drop the gc.collect every 5000 steps", {"    elif (step + 1) % 5000 == 0:\n        gc.collect()\n": ""},
          {42: 0.23})
REMOVE_TOO = ("drop the newline after a terminal's progress line", {"if interactive:\n    print()\n": ""}, {42: 0.25})
# Committed, never run: the edit the human cuts off when stopping the night, and a discard in the git-only test
WORSEN = ("all learning rates / 100", {"EMBEDDING_LR": "0.006", "UNEMBEDDING_LR": "0.00004", "SCALAR_LR": "0.005"})
NOTHING = ("unembedding lr 0.004 again", {"UNEMBEDDING_LR": "0.004"})   # already the value: nothing to commit
# Three crashes in a row, each before torch is imported (seconds per run less); the hang is killed by its limit
CRASH = ("typo in an import", {"import torch\n": "import troch\n"})
HANG = ("sleep before training", {"import gc\n": "import time; time.sleep(3600)\nimport gc\n"})
KILLED = ("killed by the OS", {"import gc\n": "import os; os.kill(os.getpid(), 9)\nimport gc\n"})
CHECK = "check after 3 crashes (noise)"


def edit(path, edits):
    """Lines `NAME = ...` set to new values, or (a key ending in a newline) that one line of source replaced."""
    src = path.read_text()
    for old, new in [(old, new) for old, new in edits.items() if old.endswith("\n")]:
        assert src.count(old) == 1, f"{path.name} has no single line {old!r}"
        src = src.replace(old, new)
    path.write_text(src)
    set_constants(path, {name: value for name, value in edits.items() if not name.endswith("\n")})


def set_constants(path, edits):
    src = path.read_text()
    for name, value in edits.items():
        src, n = re.subn(rf"^{name} = [^#\n]*?(\s*#.*)?$", lambda m: f"{name} = {value}{m.group(1) or ''}", src,
                         flags=re.M)
        assert n == 1, f"{path.name} has no single `{name} = ...` line"
    path.write_text(src)


def code_blocks(markdown):
    return [textwrap_dedent(b) for b in re.findall(r"^[ \t]*```[a-z]*\n(.*?)^[ \t]*```", markdown, re.M | re.S)]


def textwrap_dedent(block):
    import textwrap
    return textwrap.dedent(block).strip()


class Agent:
    """Follows program.md: every shell command comes from one of its code blocks, with <tag> filled in."""

    def __init__(self, repo, env, tag=TAG):
        self.repo, self.env, self.tag = repo, env, tag
        self.text = (repo / "program.md").read_text()
        self.blocks = code_blocks(self.text)
        self.B = self.A = self.M = None
        self.dataset = self.best = None
        self.crashes_in_a_row = 0

    def block(self, *needles, start=""):
        found = {b for b in self.blocks if b.startswith(start) and all(n in b for n in needles)}
        assert len(found) == 1, f"program.md should have one code block with {needles}, found {len(found)}"
        return found.pop().replace("<tag>", self.tag)

    def sh(self, command, check=True):
        proc = subprocess.run(["bash", "-c", command], cwd=self.repo, env=self.env, capture_output=True, text=True)
        assert not check or proc.returncode == 0, (command, proc.stdout, proc.stderr)
        return proc

    def head(self):
        return self.sh("git rev-parse --short=7 HEAD").stdout.strip()

    gpu_check = None   # what program.md's GPU check printed on this machine

    # -- setup and bookkeeping -------------------------------------------------
    def setup(self):
        if (self.repo / "results.tsv").exists():   # an earlier night's record: archived under its own tag
            old = re.match(r"# Notes: autoresearch/(.*)", (self.repo / "notes.md").read_text())[1]
            self.sh(self.block("mv results.tsv runs/<old>.results.tsv").replace("<old>", old))
        self.sh(self.block("git checkout -b autoresearch/<tag>"))
        shown = self.sh(self.block("print(p.DATASET)")).stdout.splitlines()
        self.dataset = shown[0]
        assert shown[1] == "3 training shards"   # the tiny corpus
        # No GPU here: program.md says stop and tell the human; this test's human chose a toy night on the CPU. The
        # machine is checked once per test process (the command imports torch: seconds, for the same answer)
        if Agent.gpu_check is None:
            Agent.gpu_check = self.sh(self.block("torch.cuda.is_available()")).stdout.strip()
        assert Agent.gpu_check == "no CUDA GPU"
        assert "uv run prepare.py --smoke" in self.text
        self.sh(self.block("printf 'commit"))
        template = self.block("# Notes: autoresearch/<tag>")   # its headings, without the example entries
        (self.repo / "notes.md").write_text("".join(line + "\n" for line in template.splitlines()
                                                    if line.startswith("#") or not line.strip()))
        before = re.search(r"the Noise line reads `(B = none yet, A = none yet,\s+M = none yet)` and Best `([^`]*)`",
                           self.text)   # program.md's form for the time before the baseline
        assert before, "program.md gives notes.md no form for the time before the baseline"
        self.write_notes(before[2], noise=" ".join(before[1].split()))

    def run(self, seed=None, limit=None):
        """The run command; returns (exit code, val_bpb, memory_gb), val_bpb None for a crash."""
        command = self.block("uv run train.py > run.log", start="timeout 600")
        if seed is not None:
            seeded = self.block("SEED=1", "SEED=2").splitlines()
            command = next(line for line in seeded if line.startswith(f"SEED={seed}"))
        if limit is not None:
            command = command.replace("timeout 600", f"timeout {limit}")
        code = int(re.search(r"exit code: (\d+)", self.sh(command).stdout)[1])
        grep = self.sh(self.block('grep "^val_bpb:'), check=False).stdout
        found = dict(line.split(":", 1) for line in grep.splitlines())
        if code != 0 or "val_bpb" not in found:
            assert self.sh(self.block("tail -n 50 run.log")).stdout.count("\n") <= 50
            return code, None, 0.0
        assert len(grep.splitlines()) == len(found) == 4   # each key the grep names starts one line of run.log
        assert found["dataset"].strip() == self.dataset   # the data never changed under the night
        check = self.sh(self.block("uv run analysis.py --check run.log"), check=False)   # the record backs it
        assert check.returncode == 0 and check.stdout.startswith(f"backed: the harness measured val_bpb "
                                                                 f"{found['val_bpb'].strip()}"), check.stderr
        return code, float(found["val_bpb"]), float(found["peak_vram_mb"]) / 1024

    def log(self, val_bpb, memory_gb, status, description):
        row = self.block("printf '%s\\t", ">> results.tsv")
        values = f'{val_bpb or 0:.6f} {memory_gb:.1f} {status} "{description}"'
        self.sh(re.sub(r'(HEAD\)")\s.*(>> results.tsv)', lambda m: f"{m[1]} {values} {m[2]}", row))

    def commit(self, description, edits, outcome=None):
        """Commit the edit (and the outcome the test sets for it); False when git has nothing to commit and
        program.md says that means do not run (main's program.md said nothing: the failure went unnoticed and the
        agent ran the unchanged code)."""
        edit(self.repo / "train.py", edits)
        if outcome:
            set_outcome(self.repo / "train.py", outcome)
        proc = self.sh(self.block("git commit -am").replace("<what you changed>", description), check=False)
        if proc.returncode != 0 and "nothing to commit" in proc.stdout:
            return "`nothing to commit`" not in self.text
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        return True

    def guard(self):
        """program.md's guard before a keep: the frozen files unchanged, then the saved model verified afresh."""
        frozen = self.sh(self.block("git diff --quiet autoresearch/<tag>-base"), check=False)
        if "frozen files unchanged" not in frozen.stdout:
            return False
        verified = self.sh(self.block("uv run prepare.py --verify"), check=False)
        assert verified.returncode == 0 and verified.stdout.startswith("verified: "), verified.stderr
        return True

    def write_notes(self, best, line_for=None, noise=None):
        """Keep notes.md in the template's sections; replace the Noise and Best lines, add one bullet."""
        text = (self.repo / "notes.md").read_text()
        noise = noise or (f"B = {self.B:.6f} (current best), A = {self.A:.6f} (last gain), M = {self.M:.6f} "
                          f"(baseline, seeds 42/1/2)")
        text = re.sub(r"(## Noise\n).*?(?=## Best)", lambda m: f"{m[1]}{noise}\ndataset: {self.dataset}\n\n", text,
                      flags=re.S)
        text = re.sub(r"(## Best\n).*?(?=## Worked)", lambda m: f"{m[1]}{best}\n\n", text, flags=re.S)
        if line_for:
            section, bullet = line_for
            text = re.sub(rf"(## {section}[^\n]*\n)", lambda m: f"{m[1]}- {bullet}\n", text)
        (self.repo / "notes.md").write_text(text)

    def runs_of(self, commit):
        """The val_bpb of every run of a commit that gave one, from results.tsv."""
        return [float(r[1]) for r in read_results(self.repo) if r[0] == commit and r[3] != "crash"]

    # -- the night ---------------------------------------------------------------
    def baseline_and_noise(self):
        """The baseline and its two noise reruns; False if the baseline crashed (program.md: stop)."""
        code, base, mem = self.run()
        if base is None:
            self.log(None, mem, "crash", "baseline")
            return False
        self.log(base, mem, "keep", "baseline")
        runs = [base]
        for seed in (1, 2):
            code, val, mem = self.run(seed=seed)
            assert code == 0
            self.log(val, mem, "discard", f"baseline rerun, seed {seed} (noise)")
            runs.append(val)
        self.M, self.B = max(runs) - min(runs), sum(runs) / len(runs)
        self.A, self.best, self.gain_kept = self.B, "the baseline", True
        self.write_notes(f"{self.head()} {self.B:.6f}: {self.best}")
        return True

    def reset(self):
        """Back to the last kept commit, with program.md's command for a discard."""
        self.sh(self.block("git reset --hard", start="git reset"))

    def mark_kept(self):
        """What program.md says to do with a kept commit besides leaving it (main said nothing more)."""
        for block in {b for b in self.blocks if b.startswith("git tag -f")}:
            self.sh(block.replace("<tag>", self.tag))

    def experiment(self, description, edits, outcome=None, limit=None, removes_code=False):
        if not self.commit(description, edits, outcome):
            return "not run"
        gain_keep = False
        code, val, mem = self.run(limit=limit)
        if val is None:
            status = "crash"
            description += {124: " (timeout)", 137: " (killed: out of memory)"}.get(code, "")
        else:
            delta = val - self.B
            keep, runs = delta <= -self.M, [val]
            if not keep and delta <= -self.M / 2:   # maybe noise: confirm with another seed
                _, again, _ = self.run(seed=1)
                self.log(again, mem, "discard", f"{description} rerun (noise)")
                keep = again is not None and again <= self.B - self.M / 2
                runs += [again] if again is not None else []
            gain_keep = keep
            if not keep and removes_code:   # simpler at equal quality, never worse than the last gain + M
                keep = delta < self.M and val <= self.A + self.M
            status = "keep" if keep and code == 0 and self.guard() else "discard"
        self.log(val, mem, status, description)   # this run's own val_bpb, never a mean
        if status == "keep":
            gain, self.B = sum(runs) / len(runs) - self.B, sum(runs) / len(runs)
            self.A = self.B if gain_keep else self.A
            self.gain_kept, self.best = gain_keep, description
            self.mark_kept()
            self.write_notes(f"{self.head()} {self.B:.6f}: {description}", ("Worked", f"{description}: {gain:+.4f}"))
        else:
            self.reset()
            self.write_notes(self.notes_best(), ("Failed", f"{description}: {status}"))
        self.crashes_in_a_row = self.crashes_in_a_row + 1 if status == "crash" else 0
        if self.crashes_in_a_row == 3:   # program.md: run the last kept commit unchanged once
            code, val, mem = self.run()
            assert val is not None, "the last kept commit crashed too: program.md says stop"
            self.log(val, mem, "discard", CHECK)
            self.B = sum(self.runs_of(self.head())) / len(self.runs_of(self.head()))
            self.A = self.B if self.gain_kept else self.A
            self.write_notes(f"{self.head()} {self.B:.6f}: {self.best}")
            self.crashes_in_a_row = 0
        return status

    def notes_best(self):
        return re.search(r"## Best\n(.*)\n", (self.repo / "notes.md").read_text())[1]

    def resume(self):
        """A fresh agent: no setup, no baseline; B, A, M and the dataset come back from what program.md shows it."""
        shown = self.sh(self.block("cat notes.md", "tail -n 30 results.tsv", "git log --oneline -20")).stdout
        noise = re.search(r"B = ([\d.]+) \(current best\), A = ([\d.]+) \(last gain\), M = ([\d.]+).*\n"
                          r"dataset: (.*)\n(?:.*\n)*?## Best\n\w+ [\d.]+: (.*)\n", shown)
        assert noise, f"program.md's resume command shows no B, A, M, dataset and best from notes.md:\n{shown}"
        self.B, self.A, self.M, self.dataset, self.best = *map(float, noise.groups()[:3]), *noise.groups()[3:]
        self.gain_kept = self.A == self.B
        self.reset()


def make_repo(directory, cache, train_edits=None, harness_edits=None, outcome=BASELINE):
    """A copy of the project in a new git repo, with the user's toy-size edits committed on main, and a train.py
    scored by the test (conftest.scripted_train_py) with `outcome` until a commit sets another."""
    repo = directory / "repo"
    repo.mkdir()
    for name in ["prepare.py", "program.md", "analysis.py", "pyproject.toml", "uv.lock", ".gitignore", "README.md"]:
        shutil.copy(ROOT / name, repo / name)
    (repo / "train.py").write_text(scripted_train_py((ROOT / "train.py").read_text(), outcome))
    shutil.copytree(ROOT / "harness", repo / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": "",
           "AUTORESEARCH_STEP_BUDGET": str(STEP_BUDGET),
           "UV_PROJECT_ENVIRONMENT": str(ROOT / ".venv"), "UV_OFFLINE": "1", "UV_NO_SYNC": "1",
           "GIT_AUTHOR_NAME": "agent", "GIT_AUTHOR_EMAIL": "agent@example.com",
           "GIT_COMMITTER_NAME": "agent", "GIT_COMMITTER_EMAIL": "agent@example.com"}
    env.pop("SEED", None)
    if shutil.which("uv", path=env["PATH"]) is None:   # CI may have uv only as a module
        bin_dir = directory / "bin"
        bin_dir.mkdir()
        (bin_dir / "uv").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m uv "$@"\n')
        (bin_dir / "uv").chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    git = lambda *args: subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)
    git("init", "-q", "-b", "main")
    set_constants(repo / "prepare.py", {**HARNESS_EDITS, **(harness_edits or {})})
    edit(repo / "train.py", {**TOY_EDITS, **(train_edits or {})})
    git("add", "-A")
    git("commit", "-qm", "toy size for a CPU")
    return repo, env


def git_out(night, *args, check=True):
    proc = subprocess.run(["git", *args], cwd=night["repo"], env=night["env"], capture_output=True, text=True)
    assert not check or proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def night(tmp_path_factory, tiny_cache):
    """Run the whole scripted night once; the tests below read what it left behind."""
    base = tmp_path_factory.mktemp("night")
    repo, env = make_repo(base, tiny_cache, harness_edits=NIGHT_WARMUP)
    first = Agent(repo, env)
    first.setup()
    assert first.baseline_and_noise()
    statuses = [first.experiment(*NEAR), first.experiment(*IMPROVE)]
    kept = first.head()
    statuses.append(first.experiment(*NOTHING))
    after_nothing = dict(head=first.head(), rows=len(read_results(repo)))
    notes_after_first = (repo / "notes.md").read_text()
    handed_over = (first.B, first.M, first.dataset)
    second = Agent(repo, env)   # the first agent's context is gone
    second.resume()
    resumed = (second.B, second.M, second.dataset)
    statuses.append(second.experiment(*CRASH))
    second.reset()   # after a compaction the agent is not sure it reset: it does it again
    after_double_reset = second.head()
    statuses += [second.experiment(*HANG, limit=HANG_LIMIT), second.experiment(*KILLED)]
    statuses += [second.experiment(*REMOVE, removes_code=True), second.experiment(*REMOVE_TOO, removes_code=True)]
    removed = second.head()
    record = dict(results=(repo / "results.tsv").read_text(), notes=(repo / "notes.md").read_text(),
                  branch_log=git_out(dict(repo=repo, env=env), "log", "--format=%h %s", "main..HEAD"))
    assert second.commit(*WORSEN)   # the human stops the agent in the middle of an experiment
    third = Agent(repo, env, tag=f"{TAG}2")   # the next night, on the same branch, a new tag
    third.setup()
    return dict(repo=repo, env=env, statuses=statuses, third=third, kept=kept, removed=removed,
                after_nothing=after_nothing,
                after_double_reset=after_double_reset, notes_after_first=notes_after_first,
                handed_over=handed_over, resumed=resumed, **record)


def read_results(repo, text=None):
    lines = (text if text is not None else (repo / "results.tsv").read_text()).splitlines()
    assert lines[0] == "\t".join(RESULTS_HEADER)
    return [line.split("\t") for line in lines[1:]]


@pytest.mark.slow
def test_results_tsv_has_the_expected_rows(night):
    rows = read_results(night["repo"], night["results"])
    assert night["statuses"] == ["discard", "keep", "not run", "crash", "crash", "crash", "keep", "discard"]
    statuses = [(status, description) for _, _, _, status, description in rows]
    assert statuses == [("keep", "baseline"), ("discard", "baseline rerun, seed 1 (noise)"),
                        ("discard", "baseline rerun, seed 2 (noise)"), ("discard", NEAR[0] + " rerun (noise)"),
                        ("discard", NEAR[0]), ("keep", IMPROVE[0]), ("crash", CRASH[0]),
                        ("crash", HANG[0] + " (timeout)"), ("crash", KILLED[0] + " (killed: out of memory)"),
                        ("discard", CHECK), ("keep", REMOVE[0]), ("discard", REMOVE_TOO[0])]
    assert rows[0][0] == rows[1][0] == rows[2][0] and all(re.fullmatch(r"[0-9a-f]{7}", r[0]) for r in rows)
    assert rows[3][0] == rows[4][0] != rows[0][0]       # the rerun of the near miss: its commit, logged first
    baseline = [float(r[1]) for r in rows[:3]]
    margin, mean = max(baseline) - min(baseline), sum(baseline) / 3
    assert -margin < float(rows[4][1]) - mean <= -margin / 2 < float(rows[3][1]) - mean   # the band, unconfirmed
    assert float(rows[5][1]) - mean <= -margin
    assert rows[5][0] == rows[9][0] == night["kept"]   # the check after 3 crashes ran the last kept commit
    assert float(rows[9][1]) == float(rows[5][1])      # the same commit and seed: the same outcome
    removal, too_far = float(rows[10][1]) - float(rows[9][1]), float(rows[11][1]) - float(rows[10][1])
    assert 0 < removal < margin and 0 < too_far < margin   # each within the noise of the kept commit before it,
    assert float(rows[11][1]) - float(rows[5][1]) > margin   # but the second more than M over the last gain
    for commit, val_bpb, memory_gb, status, _ in rows:
        assert re.fullmatch(r"\d+\.\d{6}", val_bpb) and re.fullmatch(r"\d+\.\d", memory_gb)
        assert (float(val_bpb) == 0) == (status == "crash")


@pytest.mark.slow
def test_no_kept_commit_is_lost(night):
    """An edit that changed nothing is not run, and a second reset stays on the last kept commit."""
    assert night["after_nothing"] == dict(head=night["kept"], rows=6)   # no row, no reset, nothing lost
    assert night["after_double_reset"] == night["kept"]
    assert [line.split(" ", 1)[1] for line in night["branch_log"].splitlines()] == [REMOVE[0], IMPROVE[0]]
    assert night["branch_log"].split()[0][:7] == night["removed"]
    best = git_out(night, "rev-parse", "--short=7", f"autoresearch/{TAG}-best")
    assert best == night["removed"]
    base = f"autoresearch/{TAG}-base"
    assert subprocess.run(["git", "merge-base", "--is-ancestor", base, best], cwd=night["repo"]).returncode == 0


@pytest.mark.slow
def test_git_holds_exactly_the_kept_commits(night):
    repo, env = night["repo"], night["env"]
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=repo, env=env, capture_output=True,
                            text=True).stdout
    assert "!! results.tsv" in status and "!! notes.md" in status   # untracked and ignored: they survive resets
    diff = subprocess.run(["git", "diff", "--quiet", f"autoresearch/{TAG}-base", "--", *FROZEN], cwd=repo, env=env)
    assert diff.returncode == 0


@pytest.mark.slow
def test_a_fresh_agent_resumes_from_what_program_md_shows_it(night):
    """notes.md is the scripted agent's own writing; what is tested is the hand-over: from the output of program.md's
    resume command alone, the second agent recovers the first one's B, M and dataset, which agree with what
    results.tsv holds (program.md's way to recompute them), in notes kept in the template's sections."""
    B, M, dataset = night["resumed"]
    assert (B, M) == pytest.approx(night["handed_over"][:2], abs=5e-7) and dataset == night["handed_over"][2]
    rows = read_results(night["repo"], night["results"])
    baseline = [float(r[1]) for r in rows if r[0] == rows[0][0]]
    assert len(baseline) == 3 and M == pytest.approx(max(baseline) - min(baseline), abs=2e-6)
    assert B == pytest.approx(float(next(r[1] for r in rows if r[3] == "keep" and r[0] == night["kept"])), abs=5e-7)
    template = re.search(r"```\n(# Notes: autoresearch/<tag>\n.*?)```", (night["repo"] / "program.md").read_text(),
                         re.S)[1]
    headings = [line for line in template.splitlines() if line.startswith("#")]
    for notes in (night["notes_after_first"], night["notes"]):
        assert [line for line in notes.splitlines() if line.startswith("#")] == [
            headings[0].replace("<tag>", TAG), *headings[1:]]
        assert len(notes.splitlines()) <= 40
    for description in (NEAR[0], CRASH[0], HANG[0], KILLED[0], REMOVE_TOO[0]):
        assert f"- {description}" in night["notes"]


@pytest.mark.slow
def test_morning_report_reads_the_night(night, tmp_path):
    (tmp_path / "results.tsv").write_text(night["results"])
    shutil.copy(night["repo"] / "evaluations.jsonl", tmp_path)   # the harness's record, beside results.tsv
    out = subprocess.run([sys.executable, str(ROOT / "analysis.py"), str(tmp_path / "results.tsv"), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert (s["experiments"], s["reruns"], s["kept"], s["discarded"], s["crashed"]) == (7, 4, 2, 2, 3)
    assert s["backed"] == s["rows_with_value"] == 9 and s["not_backed"] == []   # every number the agent typed
    assert s["kept_changes"][0]["runs"] == 2   # the keep and the check of the same code
    assert s["kept_changes"][1]["within_noise"] and s["kept_changes"][1]["gain"] < 0   # a removal, at equal quality
    assert s["unseen"]["baseline"] > 0 and s["kept_changes"][0]["test_bpb"] > 0   # test_bpb from the records
    assert (tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_next_night_on_the_same_branch(night):
    """README's morning archive and program.md's setup agree: the new night starts from the last kept
    commit (not from the experiment cut off when the night was stopped), with the old record committed
    under runs/ and a fresh results.tsv."""
    readme = [b for b in code_blocks((ROOT / "README.md").read_text()) if "runs/<tag>.results.tsv" in b]
    assert readme == [night["third"].block("mv results.tsv runs/<old>.results.tsv").replace("<old>", "<tag>")]
    repo = night["repo"]
    assert git_out(night, "branch", "--show-current") == f"autoresearch/{TAG}2"
    assert git_out(night, "log", "--format=%s", "-2").splitlines() == [f"results of the night {TAG}", REMOVE[0]]
    assert git_out(night, "rev-parse", f"autoresearch/{TAG}2-base") == git_out(night, "rev-parse", "HEAD")
    assert (repo / "runs" / f"{TAG}.results.tsv").read_text() == night["results"]
    assert (repo / "runs" / f"{TAG}.notes.md").read_text() == night["notes"]
    assert (repo / "results.tsv").read_text() == "\t".join(RESULTS_HEADER) + "\n"
    assert (repo / "notes.md").read_text().startswith(f"# Notes: autoresearch/{TAG}2\n")


def test_discards_go_back_to_the_kept_commit(tmp_path, tiny_cache):
    """program.md's commit, keep and discard commands alone (no training): an edit that changes nothing,
    taken for a discard, and a discard reset twice both leave the kept commit in place."""
    repo, env = make_repo(tmp_path, tiny_cache)
    agent = Agent(repo, env)
    agent.sh(agent.block("git checkout -b autoresearch/<tag>"))
    assert agent.commit(*IMPROVE)
    agent.mark_kept()
    kept = agent.head()
    if agent.commit(*NOTHING):   # the unchanged code was run: no better than the kept one, a discard
        agent.reset()
    assert agent.head() == kept
    assert agent.commit(*WORSEN)
    agent.reset()
    agent.reset()   # as after a compaction
    assert agent.head() == kept
    assert 'UNEMBEDDING_LR = 0.004 ' in (repo / "train.py").read_text()
    assert "HEAD~" not in agent.text


@pytest.mark.slow
def test_a_crashed_baseline_stops_the_night(tmp_path_factory, tiny_cache):
    """Nothing can be compared without a baseline: the agent logs the crash and stops for the human."""
    repo, env = make_repo(tmp_path_factory.mktemp("crashed"), tiny_cache, CRASH[1])
    agent = Agent(repo, env)
    agent.setup()
    assert agent.baseline_and_noise() is False
    assert re.search(r"If the baseline\s+or one of its reruns crashes", agent.text)
    assert read_results(repo) == [[agent.head(), "0.000000", "0.0", "crash", "baseline"]]
    out = subprocess.run([sys.executable, str(ROOT / "analysis.py"), "results.tsv", "--no-png"], cwd=repo,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "crashed" in out.stdout.splitlines()[2]   # the baseline line


@pytest.mark.slow
def test_one_best_in_the_morning(night, tmp_path):
    """After keeps that only removed code, notes.md's B and Best line, the -best tag and the report's best name the
    same commit and value: the last kept commit and the mean of its runs."""
    noise = re.search(r"B = ([\d.]+) \(current best\)", night["notes"])[1]
    best_line = re.search(r"## Best\n(\w+) ([\d.]+): (.*)\n", night["notes"])
    (tmp_path / "results.tsv").write_text(night["results"])
    s = json.loads(subprocess.run([sys.executable, str(ROOT / "analysis.py"), str(tmp_path / "results.tsv"),
                                   "--json", "--no-png"], capture_output=True, text=True).stdout)
    tag = git_out(night, "rev-parse", "--short=7", f"autoresearch/{TAG}-best")
    assert best_line[1] == tag == s["best"]["commit"] == night["removed"]
    assert noise == best_line[2] == f"{s['best']['val_bpb']:.6f}"
    assert best_line[3] == s["best"]["description"] == REMOVE[0]
