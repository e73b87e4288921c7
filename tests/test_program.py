"""
program.md followed literally by a scripted agent, at toy size on the CPU.

The agent takes its shell commands from program.md's own code blocks (so the test
breaks when the document and the code drift apart), in a temporary copy of the repo
whose one-time user edits shrink the model and the harness. One night, in two
sessions: the first agent sets up, runs the baseline and the noise reruns and one
improving experiment, then stops; a fresh agent with no memory resumes from the
notes and runs a worsening, a crashing and a hanging experiment.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TAG = "test"
TIME_LIMIT = 45          # program.md's `timeout 600`, shortened for the test
FROZEN = ["prepare.py", "pyproject.toml", "uv.lock"]

# The user's one-time edits before a night on a tiny machine: harness constants and model size.
HARNESS_EDITS = {"MAX_SEQ_LEN": "64", "TIME_BUDGET": "2", "EVAL_TOKENS": "64 * 16"}
TOY_EDITS = {"DEPTH": "2", "ASPECT_RATIO": "32", "HEAD_DIM": "32", "DEVICE_BATCH_SIZE": "8",
             "TOTAL_BATCH_SIZE": "8 * 64 * 2", "UNEMBEDDING_LR": "0.0004"}
# The agent's experiments: (description, edits to train.py, expected status)
IMPROVE = ("unembedding lr 0.0004 -> 0.004", {"UNEMBEDDING_LR": "0.004"})
WORSEN = ("all learning rates / 100", {"EMBEDDING_LR": "0.006", "UNEMBEDDING_LR": "0.00004", "SCALAR_LR": "0.005"})
CRASH = ("typo in the model", {"HEAD_DIM": "undefined_name"})
HANG = ("sleep before training", {"WARMDOWN_RATIO": '__import__("time").sleep(3600) or 0.5'})


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

    def __init__(self, repo, env):
        self.repo, self.env = repo, env
        self.blocks = code_blocks((repo / "program.md").read_text())
        self.B = self.M = None
        self.dataset = None

    def block(self, *needles, start=""):
        found = [b for b in self.blocks if b.startswith(start) and all(n in b for n in needles)]
        assert len(found) == 1, f"program.md should have one code block with {needles}, found {len(found)}"
        return found[0].replace("<tag>", TAG)

    def sh(self, command, check=True):
        proc = subprocess.run(["bash", "-c", command], cwd=self.repo, env=self.env, capture_output=True, text=True)
        assert not check or proc.returncode == 0, (command, proc.stdout, proc.stderr)
        return proc

    # -- setup and bookkeeping -------------------------------------------------
    def setup(self):
        self.sh(self.block("git checkout -b autoresearch/<tag>"))
        shown = self.sh(self.block("print(p.DATASET)")).stdout.splitlines()
        self.dataset = shown[0]
        assert shown[1] == "3 training shards"   # the tiny corpus
        self.sh(self.block("printf 'commit"))
        template = self.block("# Notes: autoresearch/<tag>")   # its headings, without the example entries
        (self.repo / "notes.md").write_text("".join(line + "\n" for line in template.splitlines()
                                                    if line.startswith("#") or not line.strip()))

    def run(self, seed=None):
        """The run command; returns (exit code, val_bpb, memory_gb), val_bpb None for a crash."""
        command = self.block("uv run train.py > run.log", start="timeout 600")
        if seed is not None:
            command = next(line for line in self.block("SEED=1", "SEED=2").splitlines() if line.startswith(f"SEED={seed}"))
        code = int(re.search(r"exit code: (\d+)", self.sh(command.replace("timeout 600", f"timeout {TIME_LIMIT}")).stdout)[1])
        found = dict(line.split(":", 1) for line in self.sh(self.block('grep "^val_bpb:'), check=False).stdout.splitlines())
        if code != 0 or "val_bpb" not in found:
            assert self.sh(self.block("tail -n 50 run.log")).stdout.count("\n") <= 50
            return code, None, 0.0
        assert found["dataset"].strip() == self.dataset   # the data never changed under the night
        return code, float(found["val_bpb"]), float(found["peak_vram_mb"]) / 1024

    def log(self, val_bpb, memory_gb, status, description):
        row = self.block("printf '%s\\t", ">> results.tsv")
        values = f'{val_bpb or 0:.6f} {memory_gb:.1f} {status} "{description}"'
        self.sh(re.sub(r'(HEAD\)")\s.*(>> results.tsv)', lambda m: f"{m[1]} {values} {m[2]}", row))

    def commit(self, description, edits):
        set_constants(self.repo / "train.py", edits)
        self.sh(self.block("git commit -am").replace("<what you changed>", description))

    def frozen_files_unchanged(self):
        return "frozen files unchanged" in self.sh(self.block("git diff --quiet autoresearch/<tag>-base"), check=False).stdout

    def write_notes(self, best, line_for=None):
        """Keep notes.md in the template's sections; replace the Noise and Best lines, add one bullet."""
        text = (self.repo / "notes.md").read_text()
        text = re.sub(r"(## Noise\n).*?(?=## Best)", lambda m: f"{m[1]}B = {self.B:.6f} (current best), "
                      f"M = {self.M:.6f} (baseline, seeds 42/1/2)\ndataset: {self.dataset}\n\n", text, flags=re.S)
        text = re.sub(r"(## Best\n).*?(?=## Worked)", lambda m: f"{m[1]}{best}\n\n", text, flags=re.S)
        if line_for:
            section, bullet = line_for
            text = re.sub(rf"(## {section}[^\n]*\n)", lambda m: f"{m[1]}- {bullet}\n", text)
        (self.repo / "notes.md").write_text(text)

    # -- the night ---------------------------------------------------------------
    def baseline_and_noise(self):
        code, base, mem = self.run()
        assert code == 0, self.sh("tail -n 30 run.log").stdout
        self.log(base, mem, "keep", "baseline")
        runs = [base]
        for seed in (1, 2):
            code, val, mem = self.run(seed=seed)
            assert code == 0
            self.log(val, mem, "discard", f"baseline rerun, seed {seed} (noise)")
            runs.append(val)
        self.M, self.B = max(runs) - min(runs), sum(runs) / len(runs)
        commit = self.sh("git rev-parse --short=7 HEAD").stdout.strip()
        self.write_notes(f"{commit} {self.B:.6f}: the baseline")

    def experiment(self, description, edits):
        self.commit(description, edits)
        code, val, mem = self.run()
        if val is None:
            status = "crash"
        else:
            delta = val - self.B
            keep = delta <= -self.M
            if not keep and delta <= -self.M / 2:   # maybe noise: confirm with another seed
                _, again, _ = self.run(seed=1)
                self.log(again or 0, mem, "discard", f"{description} rerun (noise)")
                keep = again is not None and again <= self.B - self.M / 2
                val = (val + again) / 2 if keep else val
            status = "keep" if keep and code == 0 and self.frozen_files_unchanged() else "discard"
        self.log(val, mem, status, description)
        if status == "keep":
            gain, self.B = val - self.B, val
            commit = self.sh("git rev-parse --short=7 HEAD").stdout.strip()
            self.write_notes(f"{commit} {val:.6f}: {description}", ("Worked", f"{description}: {gain:+.4f}"))
        else:
            self.sh(self.block("git reset --hard HEAD~1"))
            self.write_notes(self.notes_best(), ("Failed", f"{description}: {status}"))
        return status

    def notes_best(self):
        return re.search(r"## Best\n(.*)\n", (self.repo / "notes.md").read_text())[1]

    def resume(self):
        """A fresh agent: no setup, no baseline; B and M come back from notes.md."""
        shown = self.sh(self.block("cat notes.md", "tail -n 30 results.tsv", "git log --oneline -20")).stdout
        noise = re.search(r"B = ([\d.]+) \(current best\), M = ([\d.]+).*\ndataset: (.*)\n", shown)
        self.B, self.M, self.dataset = float(noise[1]), float(noise[2]), noise[3]


def make_repo(directory, cache):
    """A copy of the project in a new git repo, with the user's toy-size edits committed on main."""
    repo = directory / "repo"
    repo.mkdir()
    for name in ["prepare.py", "train.py", "program.md", "analysis.py", "pyproject.toml", "uv.lock", ".gitignore",
                 "README.md"]:
        shutil.copy(ROOT / name, repo / name)
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": "",
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
    set_constants(repo / "prepare.py", HARNESS_EDITS)
    set_constants(repo / "train.py", TOY_EDITS)
    git("add", "-A")
    git("commit", "-qm", "toy size for a CPU")
    return repo, env


@pytest.fixture(scope="module")
def night(tmp_path_factory, tiny_cache):
    """Run the whole scripted night once; the tests below read what it left behind."""
    base = tmp_path_factory.mktemp("night")
    repo, env = make_repo(base, tiny_cache)
    first = Agent(repo, env)
    first.setup()
    first.baseline_and_noise()
    statuses = [first.experiment(*IMPROVE)]
    notes_after_first = (repo / "notes.md").read_text()
    second = Agent(repo, env)   # the first agent's context is gone
    second.resume()
    statuses += [second.experiment(*WORSEN), second.experiment(*CRASH), second.experiment(*HANG)]
    return dict(repo=repo, env=env, statuses=statuses, first=first, second=second,
                notes_after_first=notes_after_first)


def read_results(repo):
    lines = (repo / "results.tsv").read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    return [line.split("\t") for line in lines[1:]]


def test_results_tsv_has_the_expected_rows(night):
    rows = read_results(night["repo"])
    statuses = [(status, description) for _, _, _, status, description in rows]
    assert statuses[:3] == [("keep", "baseline"), ("discard", "baseline rerun, seed 1 (noise)"),
                            ("discard", "baseline rerun, seed 2 (noise)")]
    assert statuses[-4:] == [("keep", IMPROVE[0]), ("discard", WORSEN[0]), ("crash", CRASH[0]), ("crash", HANG[0])]
    assert len(rows) == 7   # the resumed agent ran no second baseline
    assert rows[0][0] == rows[1][0] == rows[2][0] and all(re.fullmatch(r"[0-9a-f]{7}", r[0]) for r in rows)
    for commit, val_bpb, memory_gb, status, _ in rows:
        assert re.fullmatch(r"\d+\.\d{6}", val_bpb) and re.fullmatch(r"\d+\.\d", memory_gb)
        assert (float(val_bpb) == 0) == (status == "crash")


def test_git_holds_exactly_the_kept_commits(night):
    repo, env = night["repo"], night["env"]
    log = subprocess.run(["git", "log", "--format=%h %s", "main..HEAD"], cwd=repo, env=env, capture_output=True,
                         text=True).stdout.split("\n")
    assert [line.split(" ", 1)[1] for line in log if line] == [IMPROVE[0]]
    kept = [r[0] for r in read_results(repo) if r[3] == "keep"]
    assert log[0].split()[0][:7] == kept[-1]
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=repo, env=env, capture_output=True,
                            text=True).stdout
    assert "!! results.tsv" in status and "!! notes.md" in status   # untracked and ignored: they survive resets
    diff = subprocess.run(["git", "diff", "--quiet", f"autoresearch/{TAG}-base", "--", *FROZEN], cwd=repo, env=env)
    assert diff.returncode == 0


def test_notes_are_bounded_and_agree_with_results(night):
    repo = night["repo"]
    notes = (repo / "notes.md").read_text()
    assert len(notes.splitlines()) <= 40 and len(night["notes_after_first"].splitlines()) <= 40
    rows = read_results(repo)
    baseline = [float(r[1]) for r in rows if r[0] == rows[0][0]]
    margin = max(baseline) - min(baseline)
    assert f"M = {margin:.6f}" in notes or abs(night["second"].M - margin) < 2e-6
    best_commit, best_val = next((r[0], float(r[1])) for r in reversed(rows) if r[3] == "keep")
    assert re.search(rf"## Best\n{best_commit} {best_val:.6f}", notes)
    assert f"B = {best_val:.6f}" in notes
    for description in (WORSEN[0], CRASH[0], HANG[0]):
        assert f"- {description}" in notes


def test_morning_report_reads_the_night(night, tmp_path):
    repo = night["repo"]
    png = tmp_path / "progress.png"
    out = subprocess.run([sys.executable, "analysis.py", "results.tsv", "--png", str(png)], cwd=repo,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "experiments" in out.stdout.lower() and IMPROVE[0] in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
