"""Shared fixtures: a tiny synthetic corpus and a cache built from it by the real prepare.py."""

import atexit
import hashlib
import importlib.util
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _isolate_environment():
    """
    Before any test, fixture or subprocess: none of the user's AUTORESEARCH_* or HF_* settings survive, and the
    default cache is a fresh directory of this session. A helper that merges os.environ into a subprocess's
    environment can then never reach ~/.cache/autoresearch, the user's AUTORESEARCH_CACHE or the hub.
    """
    for name in [n for n in os.environ if n.startswith(("AUTORESEARCH_", "HF_", "HUGGINGFACE_"))]:
        del os.environ[name]
    home = Path(tempfile.mkdtemp(prefix="autoresearch-tests-"))
    # no hub but the tests' own: port 9 (discard) on this machine answers nothing, so a stray download fails fast
    os.environ.update(AUTORESEARCH_CACHE=str(home / "cache"), HF_HOME=str(home / "hf"),
                      HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1")
    # One torch thread, here and in every subprocess, unless the person running pytest set OMP_NUM_THREADS (to run
    # the suite at another count): on a busy 2-core machine a toy training step takes 3 s with two threads and 0.5 s
    # with one
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # With PYTHONDONTWRITEBYTECODE and an environment synced without --compile-bytecode, every subprocess compiles
    # torch's modules again (~4 s each): keep the bytecode of this session in its own directory instead, never
    # beside the sources
    torch = importlib.util.find_spec("torch")
    if sys.dont_write_bytecode and not os.path.exists(importlib.util.cache_from_source(torch.origin)):
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix = str(home / "pycache")
        sys.dont_write_bytecode = False
    atexit.register(shutil.rmtree, home, ignore_errors=True)


_isolate_environment()

# The harness's modules (the command line, conversions, the records, the smoke run's toy size, the attention
# kernels): imported once the environment above is isolated
from harness import smoke   # noqa: E402
import prepare   # noqa: E402

# An evaluation in this process records itself in the session's directory, never in the repo's evaluations.jsonl
prepare.RECORDS = Path(os.environ["AUTORESEARCH_CACHE"]).parent / "evaluations.jsonl"


# pytest-xdist hands out whole modules (`--dist loadscope --no-loadscope-reorder`), in this order: the longest
# first (the Ray cluster's, the scripted night, the cache faults, the smoke run; by `--durations`), so that no worker
# is left running a long module alone at the end. Modules not named here go last.
LONGEST_FIRST = ["test_parallel", "test_integrity", "test_program", "test_prepare", "test_train", "test_dataset",
                 "test_records", "test_download", "test_attention", "test_analysis", "test_gpu_check", "test_house"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))
    for item in items:
        if item.get_closest_marker("ray"):   # a Ray test starts a cluster and runs toy nights: an end-to-end run
            item.add_marker(pytest.mark.slow)


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu"):
        import torch
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")


def one_line(stderr):
    """The one line a failure prints: what failed and what to do, never a traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"one line expected on stderr, got {len(lines)}:\n{stderr[-3000:]}"
    return lines[0]


def fails_in_one_line(proc, *needles):
    """A command that failed as the harness fails: exit code 1 and one line on stderr holding every needle."""
    line = one_line(proc.stderr)
    assert proc.returncode == 1, (proc.returncode, line)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def toy_train_py(directory, **edits):
    """train.py at the smoke run's toy size (harness.smoke.smoke_script), with more of its `NAME = ...` lines edited."""
    path = Path(directory) / "train.py"
    path.write_text(smoke.smoke_script((ROOT / "train.py").read_text(), **edits))
    return path


SYLLABLES = [a + b for a in "bcdfghjklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ou", "ee", "ai")]
EXTRAS = ["你好", "世界", "東京", "数据", "über", "naïve", "café", "Ωmega"]
_drawn = {}   # seed -> (its generator, the documents drawn from it so far): the same corpora recur across tests


def make_documents(n_docs, seed):
    """Word salad over a fixed syllable inventory, with digits, punctuation, code-ish lines and some CJK. The first
    n documents of a seed's stream, each drawn once per test process (~1 ms a document)."""
    rng, docs = _drawn.setdefault(seed, (random.Random(seed), []))
    while len(docs) < n_docs:
        words = []
        for _ in range(max(3, int(rng.lognormvariate(4.5, 0.9)))):
            r = rng.random()
            if r < 0.06:
                words.append(str(rng.randint(0, 99999)))
            elif r < 0.08:
                words.append(rng.choice(EXTRAS))
            else:
                w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
                words.append(w.capitalize() if rng.random() < 0.1 else w)
            if rng.random() < 0.08:
                words[-1] += rng.choice([".", ",", "!", "?", ";", ":", "\n", "()", " = 1"])
        docs.append(" ".join(words))
    return docs[:n_docs]


def write_shard(path, docs, row_group_size=64):
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group_size)


def make_corpus(directory, n_train_shards=3, docs_per_shard=400, seed=0):
    """Training shards shard_00000 ..., the test shard shard_06541 and the pinned validation shard shard_06542."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_train_shards):
        write_shard(directory / f"shard_{i:05d}.parquet", make_documents(docs_per_shard, seed + i))
    write_shard(directory / "shard_06541.parquet", make_documents(docs_per_shard // 4, seed + 2000))
    write_shard(directory / "shard_06542.parquet", make_documents(docs_per_shard // 2, seed + 1000))
    return directory


def source_root(cache, directory):
    """Where `prepare.py --source DIR` keeps its files: sources/local--<its name>-<hash of its path>."""
    directory = Path(directory).resolve()
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:8]
    return Path(cache) / "sources" / f"local--{directory.name}-{digest}"


def run_prepare(cache, *args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {}), "AUTORESEARCH_CACHE": str(cache)}   # the test's cache, always
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# The user's one-time edits for a night on a CPU: the harness's constants in prepare.py's source (its frozen values for
# that repo) and train.py's model size
TOY_HARNESS = {"MAX_SEQ_LEN": "64", "EVAL_TOKENS": "64 * 8"}
TOY_MODEL = {"DEPTH": "2", "ASPECT_RATIO": "16", "HEAD_DIM": "32", "DEVICE_BATCH_SIZE": "2",
             "TOTAL_BATCH_SIZE": "2 * 64"}


def set_lines(path, values):
    """Lines `NAME = ...` of a source file set to new values, each found exactly once."""
    src = Path(path).read_text()
    for name, value in values.items():
        src, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", src, count=1, flags=re.M)
        assert n == 1, name
    Path(path).write_text(src)


def toy_repo(root, cache):
    """A git repo at `root` with prepare.py, harness/ and train.py at toy size committed on main; returns the
    environment its runs take (the cache, the CPU, a step budget of 1) and a git helper."""
    root.mkdir(parents=True)
    for name in ("prepare.py", "train.py", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "harness", root / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    set_lines(root / "prepare.py", TOY_HARNESS)
    set_lines(root / "train.py", TOY_MODEL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "SEED"))}
    env.update(AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_STEP_BUDGET="1", CUDA_VISIBLE_DEVICES="",
               GIT_AUTHOR_NAME="a", GIT_AUTHOR_EMAIL="a@example.com", GIT_COMMITTER_NAME="a",
               GIT_COMMITTER_EMAIL="a@example.com")
    git = lambda *args: subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True,
                                       text=True).stdout.strip()
    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-qm", "toy size")
    return env, git


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A cache directory built by `prepare.py --source` from the tiny corpus (in sources/<its own>/, active)."""
    base = tmp_path_factory.mktemp("harness")
    corpus = make_corpus(base / "corpus")
    cache = base / "cache"
    result = run_prepare(cache, "--source", str(corpus))
    assert result.returncode == 0, result.stderr
    return cache


def point_harness_at(prepare, cache, monkeypatch):
    """prepare.py's paths moved to a cache and its active dataset, in this process, for one test."""
    from harness.datasets import configured_dataset, dataset_root
    monkeypatch.setattr(prepare, "CACHE_DIR", cache)
    root = dataset_root(configured_dataset(cache)[0], cache)   # e.g. the --source directory's own, made active
    monkeypatch.setattr(prepare, "DATA_DIR", root / "data")
    monkeypatch.setattr(prepare, "TOKENIZER_DIR", root / "tokenizer")


@pytest.fixture
def harness(tiny_cache, monkeypatch):
    """prepare.py pointed at the tiny cache, with the sequence length and eval size shrunk in-process."""
    import prepare
    point_harness_at(prepare, tiny_cache, monkeypatch)
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 64)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 64 * 20)
    return prepare


# A train.py whose val_bpb the test chooses, per commit and SEED, through the real evaluate_bpb and summary block. It
# trains as before, and is scored on constant logits: 0, and `a` for BOS. BOS targets carry no bytes and are not
# scored, so every scored token costs c = log(V - 1 + e^a) nats; with a set so that c = ln V + d, val_bpb is
# K * (ln V + d), K fixed by the validation rows. Every decision (a delta against M or M / 2, a mean of runs, a
# margin) then compares differences of d alone: the test sets its outcome exactly, whatever the machine learns.
SCRIPTED_SCORE = """\
SCRIPTED_NATS = {nats}  # the test's outcome of this commit: nats above uniform, per SEED


class ScriptedGPT(GPT):
    \"\"\"The test's GPT (tests/conftest.py): trains as GPT does; called without targets, constant logits, so that
    every scored token costs ln(vocab) + SCRIPTED_NATS[SEED] nats. Defined above `# Setup`, it is also the model
    `prepare.py --verify` rebuilds.\"\"\"

    def forward(self, idx, targets=None, **kwargs):
        if targets is not None:
            return super().forward(idx, targets, **kwargs)
        vocab_size = self.config.vocab_size
        d = SCRIPTED_NATS[int(os.environ.get("SEED", 42))]
        logits = torch.zeros(*idx.shape, vocab_size, device=idx.device)
        logits[..., vocab_size - 4] = math.log1p(vocab_size * math.expm1(d))  # BOS (<|reserved_0|>): e^a = V e^d - V + 1
        return logits


GPT = ScriptedGPT


"""


def scripted_train_py(src, nats):
    """train.py's source with ScriptedGPT defined just above its `# Setup` line, scoring `nats` ({seed: d})."""
    found = list(re.finditer(r"^# -+\n# Setup\b", src, re.M))
    assert len(found) == 1, "train.py has no single `# Setup` section"
    return src[:found[0].start()] + SCRIPTED_SCORE.format(nats=_nats(nats)) + src[found[0].start():]


def set_outcome(path, nats):
    """A scripted train.py's outcome, {seed: d}: d >= 0 nats above uniform for each SEED it will run with."""
    src, n = re.subn(r"^([ \t]*SCRIPTED_NATS = )\{[^}\n]*\}", lambda m: m[1] + _nats(nats), Path(path).read_text(),
                     flags=re.M)
    assert n == 1, f"{path} is not a scripted train.py (conftest.scripted_train_py)"
    Path(path).write_text(src)


def _nats(nats):
    assert nats and all(d >= 0 for d in nats.values()), nats   # e^a = V e^d - (V - 1) > 0 for any d >= 0
    return repr({int(seed): float(d) for seed, d in nats.items()})
