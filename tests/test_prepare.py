"""The frozen harness: tokenizer, dataloader, metric and the prepare.py command, on the CPU with no network."""

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import (ROOT, fails_in_one_line, make_corpus, make_documents, point_harness_at, run_prepare,
                      source_root, write_shard)
from harness import loader as harness_loader, records, tokens
from tools.reference_loader import reference_rows

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def test_tokenizer_round_trips_and_has_fixed_special_ids(harness):
    tok = harness.Tokenizer.from_directory()
    assert tok.get_vocab_size() == 8192
    assert tok.get_bos_token_id() == 8188
    assert [tok.enc.encode_single_token(f"<|reserved_{i}|>") for i in range(4)] == [8188, 8189, 8190, 8191]
    for text in ["", "hello world", "Numbers 1234567 and 3.14159!", "你好，世界 — naïve café\n\ttabs",
                 "def f(x):\n    return x ** 2  # code"]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(["a b", "c"], prepend=tok.get_bos_token_id())
    assert ids == [[8188] + tok.encode("a b"), [8188] + tok.encode("c")]
    assert tok.encode("a b", prepend="<|reserved_0|>") == [8188] + tok.encode("a b")
    # digits split in groups of at most two (the \p{N}{1,2} pattern)
    assert all(len(tok.decode([t])) <= 2 for t in tok.encode("1234567"))


def test_token_bytes_are_utf8_lengths(harness):
    tok = harness.Tokenizer.from_directory()
    token_bytes = harness.get_token_bytes()
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (8192,)
    expected = [len(tok.enc.decode_single_token_bytes(i)) for i in range(8188)]
    assert token_bytes[:8188].tolist() == expected
    assert token_bytes[8188:].tolist() == [0, 0, 0, 0]
    assert token_bytes[:256].eq(1).all()   # the 256 single bytes come first


def test_tokenizer_is_stored_as_data_not_pickle(harness):
    meta = json.loads((harness.TOKENIZER_DIR / "tokenizer.json").read_text())
    assert len(meta["mergeable_ranks"]) == 8188
    assert meta["special_tokens"] == {f"<|reserved_{i}|>": 8188 + i for i in range(4)}


def test_missing_tokenizer_says_what_to_run(tmp_path, harness):
    with pytest.raises(harness.HarnessError, match=r"no tokenizer in .*run `uv run prepare.py`"):
        harness.Tokenizer.from_directory(tmp_path)

# ---------------------------------------------------------------------------
# Dataloader
# ---------------------------------------------------------------------------


def never(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} was called")
    return fail


@pytest.fixture(scope="module")
def oracle_rows():
    """The oracle's rows by split: the same for the loader's two sources, so packed once for both (seconds each)."""
    return {}


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("cached", [True, False], ids=["token-cache", "tokenize-on-the-fly"])
def test_loader_matches_direct_best_fit(harness, monkeypatch, oracle_rows, split, cached):
    tok = harness.Tokenizer.from_directory()
    if cached:   # every document from the token cache prepare.py wrote: no shard is tokenized here
        monkeypatch.setattr(harness_loader, "tokenize_shard", never("tokenize_shard"))
    else:
        tok.id = None   # no token cache for this tokenizer: the loader tokenizes the parquet files itself
    B, T, n_batches = 8, 64, 250
    loader = harness_loader.make_dataloader(tok, B, T, harness.list_shards(split), device="cpu")
    got = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y, _ in (next(loader) for _ in range(n_batches))])
    if split not in oracle_rows:
        oracle_rows[split] = reference_rows(harness.list_shards(split), tok, T, B * n_batches)
    assert got.tolist() == oracle_rows[split]


def test_validation_rows_are_cached_and_equal_to_packing(harness, monkeypatch):
    tok = harness.Tokenizer.from_directory()
    rows = harness.validation_rows(tok, 64, 50)
    assert rows.tolist() == reference_rows(harness.list_shards("val"), tok, 64, 50)
    rows_file = tokens.tokens_dir(harness.DATA_DIR.parent, tok) / "val_rows_T64_N50.npy"
    assert records.read_record(rows_file)["made_from"]["rows"] == 50
    monkeypatch.setattr(harness_loader, "BestFitPacker", never("packing"))   # the second time: read from the cache
    assert harness.validation_rows(tok, 64, 50).tolist() == rows.tolist()


def test_loader_rows_are_bos_aligned_shifted_and_deterministic(harness):
    tok = harness.Tokenizer.from_directory()
    bos = tok.get_bos_token_id()
    a = harness.make_dataloader(tok, 3, 64, "train", device="cpu")
    b = harness.make_dataloader(tok, 3, 64, "train", device="cpu")
    for _ in range(20):
        (x, y, epoch), (x2, y2, _) = next(a), next(b)
        assert x.shape == y.shape == (3, 64) and x.dtype == y.dtype == torch.int64 and epoch >= 1
        assert x[:, 0].eq(bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x.max() <= bos and y.max() <= bos   # only BOS among the special tokens: no padding


def test_training_stream_never_contains_validation_documents(harness):
    tok = harness.Tokenizer.from_directory()
    bos = tok.get_bos_token_id()
    val_docs = set(pq.read_table(harness.DATA_DIR / "shard_06542.parquet").column("text").to_pylist())
    train_docs = set()
    for path in harness.list_shards("train"):
        train_docs |= set(pq.read_table(path).column("text").to_pylist())
    assert harness.VAL_FILENAME not in [p.name for p in harness.list_shards("train")]
    loader = harness.make_dataloader(tok, 8, 512, "train", device="cpu")
    epochs, whole = set(), 0
    for _ in range(200):   # > 1 epoch of the tiny corpus
        x, y, epoch = next(loader)
        epochs.add(epoch)
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            for s, e in zip(starts[:-1], starts[1:-1]):   # pieces followed by another BOS are whole documents
                text = tok.decode(row[s + 1:e])
                assert text in train_docs and text not in val_docs
                whole += 1
    assert whole > 1000 and epochs >= {1, 2}

# ---------------------------------------------------------------------------
# The metric
# ---------------------------------------------------------------------------


class Uniform(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, idx, *rest):
        self.calls.append((idx.shape, len(rest)))
        return torch.zeros(*idx.shape, self.vocab_size) + self.dummy


class Bigram(torch.nn.Module):
    """A causal model: logits depend on the current token only (a rank-16 table: a full V x V one takes a second
    to initialise)."""

    def __init__(self, vocab_size, peek=0, cross_row=False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(vocab_size, 16, generator=gen))
        self.unembed = torch.nn.Parameter(torch.randn(16, vocab_size, generator=gen) / 2)
        self.peek, self.cross_row = peek, cross_row

    def table(self, idx):
        return self.embed[idx] @ self.unembed

    def forward(self, idx):
        logits = self.table(idx)
        if self.peek:   # leaks the next token: a broken causal mask
            logits = logits + 0.5 * self.table(torch.roll(idx, -self.peek, dims=1))
        if self.cross_row:   # leaks another row of the batch
            logits = logits + 0.5 * self.table(torch.roll(idx, 1, dims=0)).mean(dim=1, keepdim=True)
        return logits


def test_uniform_model_known_answer(harness):
    tok = harness.Tokenizer.from_directory()
    V, T = tok.get_vocab_size(), harness.MAX_SEQ_LEN
    n_rows = harness.EVAL_TOKENS // T
    token_bytes = harness.get_token_bytes()
    rows = torch.tensor(reference_rows(harness.list_shards("val"), tok, T, n_rows))
    targets = rows[:, 1:].flatten()
    scored_tokens = (token_bytes[targets] > 0).sum().item()
    scored_bytes = token_bytes[targets].sum().item()
    expected = math.log(V) * scored_tokens / (math.log(2) * scored_bytes)
    model = Uniform(V)
    assert harness.evaluate_bpb(model, tok, 8) == pytest.approx(expected, rel=1e-6)   # float32 ln(V)
    assert scored_tokens < targets.numel()   # BOS targets exist and are excluded
    # the model only ever sees inputs, and exactly n_rows rows are scored, then the test rows; the causality probe's
    # calls are shaped like scoring calls, one for each probed batch (at most 4: here the 3 there are)
    assert all(rest == 0 and shape[1] == T for shape, rest in model.calls)
    assert [shape[0] for shape, _ in model.calls if shape[0] != 5] == [8] * 4 + [4] * 2
    assert sum(shape[0] for shape, _ in model.calls) == n_rows + n_rows + n_rows // 4


def test_same_value_for_any_batch_size(harness):
    tok = harness.Tokenizer.from_directory()
    model = Bigram(tok.get_vocab_size())
    values = [harness.evaluate_bpb(model, tok, b) for b in (1, 3, 8)]
    assert values[0] == pytest.approx(values[1], rel=1e-6) and values[0] == pytest.approx(values[2], rel=1e-6)
    assert values[0] > 0


class OutOfMemoryAbove(Bigram):
    """Runs out of GPU memory (simulated, with the error torch raises) on a batch of more than `limit` rows."""

    def __init__(self, vocab_size, limit):
        super().__init__(vocab_size)
        self.limit = limit

    def forward(self, idx):
        if idx.size(0) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return super().forward(idx)


def test_an_evaluation_out_of_memory_halves_its_batch_and_scores_the_same_rows(harness, tmp_path, monkeypatch,
                                                                                 capsys):
    from harness import evaluations
    monkeypatch.setattr(harness, "RECORDS", tmp_path / "evaluations.jsonl")
    tok = harness.Tokenizer.from_directory()
    expected = harness.evaluate_bpb(Bigram(tok.get_vocab_size()), tok, 2)
    capsys.readouterr()
    assert harness.evaluate_bpb(OutOfMemoryAbove(tok.get_vocab_size(), 2), tok, 8) == pytest.approx(expected, rel=1e-9)
    assert capsys.readouterr().out.splitlines() == [
        "evaluation: a batch of 8 runs out of GPU memory: scoring with 4",
        "evaluation: a batch of 4 runs out of GPU memory: scoring with 2"]
    records, _ = evaluations.read(tmp_path / "evaluations.jsonl")
    assert [r["eval_batch_size"] for r in records] == [2, 2]   # what each evaluation used, in its record
    assert records[1]["test_bpb"] == pytest.approx(records[0]["test_bpb"], rel=1e-9)


@pytest.mark.parametrize("peek, cross_row", [(1, False), (5, False), (0, True)])
def test_model_that_sees_the_future_is_refused(harness, peek, cross_row):
    tok = harness.Tokenizer.from_directory()
    with pytest.raises(harness.HarnessError, match="sees the future"):
        harness.evaluate_bpb(Bigram(tok.get_vocab_size(), peek=peek, cross_row=cross_row), tok, 4)


def test_logits_of_the_wrong_shape_are_refused(harness):
    tok = harness.Tokenizer.from_directory()
    with pytest.raises(harness.HarnessError, match="must return a plain torch.Tensor of logits of shape"):
        harness.evaluate_bpb(Uniform(100), tok, 4)

# ---------------------------------------------------------------------------
# The command: --source and its failures
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_source_builds_cache_and_rerun_is_a_no_op(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, name in enumerate(["b.parquet", "a.parquet", "c.parquet"]):   # no canonical names: last sorted = val,
                                                                           # the one before it = test
        write_shard(corpus / name, make_documents(300, seed=i))
    first = run_prepare(tmp_path / "cache", "--source", str(corpus))
    assert first.returncode == 0, first.stderr
    data = source_root(tmp_path / "cache", corpus) / "data"
    assert sorted(p.name for p in data.glob("*.parquet")) == [
        "shard_00000.parquet", "shard_06541.parquet", "shard_06542.parquet"]
    assert (data / "shard_06542.parquet").read_bytes() == (corpus / "c.parquet").read_bytes()
    assert (data / "shard_06541.parquet").read_bytes() == (corpus / "b.parquet").read_bytes()
    assert (data / "shard_00000.parquet").read_bytes() == (corpus / "a.parquet").read_bytes()
    assert "trained 8192 tokens" in first.stdout
    second = run_prepare(tmp_path / "cache", "--source", str(corpus))
    assert second.returncode == 0 and "0 copied" in second.stdout and "tokenizer: up to date" in second.stdout


@pytest.mark.parametrize("problem, message", [
    ("no_text_column", "has no string column named 'text'"),
    ("empty", "has no rows"),
    ("corrupt", "is not a readable parquet file"),
    ("one_file", "needs at least 2 parquet files"),
])
def test_bad_source_fails_with_one_line_and_writes_nothing(tmp_path, problem, message):
    corpus = make_corpus(tmp_path / "corpus", n_train_shards=2, docs_per_shard=50)
    if problem == "no_text_column":
        pq.write_table(pa.table({"content": ["x"] * 10}), corpus / "shard_00001.parquet")
    elif problem == "empty":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), corpus / "shard_00001.parquet")
    elif problem == "corrupt":
        good = (corpus / "shard_00001.parquet").read_bytes()
        (corpus / "shard_00001.parquet").write_bytes(good[: len(good) // 2])
    else:
        for p in list(corpus.iterdir())[1:]:
            p.unlink()
    result = run_prepare(tmp_path / "cache", "--source", str(corpus))
    fails_in_one_line(result, message)
    root = source_root(tmp_path / "cache", corpus)
    assert not list((tmp_path / "cache").rglob("*.parquet")) and not (root / "tokenizer").exists()


def test_training_without_data_says_what_to_run(tmp_path, harness, monkeypatch):
    monkeypatch.setattr(harness, "DATA_DIR", tmp_path / "nothing")
    tok = harness.Tokenizer.from_directory()
    with pytest.raises(harness.HarnessError, match=r"no training shards in .*run `uv run prepare.py`"):
        next(harness.make_dataloader(tok, 2, 16, "train", device="cpu"))

# ---------------------------------------------------------------------------
# The tests themselves: never a user's files
# ---------------------------------------------------------------------------


def tree(directory):
    """Every file under a directory with a hash of its contents."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(directory).rglob("*") if p.is_file()}


@pytest.mark.slow
def test_the_suite_never_touches_the_users_cache(tmp_path):
    """Run cache-writing tests with the user's variables exported: the directories they name stay byte-identical."""
    user = tmp_path / "user"
    make_corpus(user / "cache" / "data", n_train_shards=1, docs_per_shard=20, seed=99)   # the user's own shards
    (user / "cache" / "tokenizer").mkdir()
    (user / "cache" / "tokenizer" / "tokenizer.json").write_text('{"the user": "tokenizer"}')
    (user / "stories").mkdir()
    (user / "stories" / "train.jsonl").write_text('{"text": "the user\'s own dataset"}\n')
    (user / "hf").mkdir()
    (user / "hf" / "token").write_text("hf_user_token")
    before = tree(user)
    env = {**os.environ, "AUTORESEARCH_CACHE": str(user / "cache"), "AUTORESEARCH_DATASET": str(user / "stories"),
           "HF_HOME": str(user / "hf")}
    tests = ["tests/test_download.py::test_download_builds_the_cache_and_a_rerun_fetches_nothing",   # cache, hub
             "tests/test_dataset.py::test_conflicting_arguments_are_refused"]   # prepare's own CLI, in-process
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *tests],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert tree(user) == before


@pytest.mark.parametrize("inside", ["data", "."])
def test_source_inside_the_cache_is_refused_and_deletes_nothing(tmp_path, inside):
    cache = tmp_path / "cache"
    make_corpus(cache / "data", n_train_shards=2, docs_per_shard=50)   # a cache as prepare.py laid it out before
    before = tree(cache)
    result = run_prepare(cache, "--source", str(cache / inside))
    fails_in_one_line(result, "is inside the cache")
    assert tree(cache) == before

# ---------------------------------------------------------------------------
# Faults in the cache: train.py's start-up refuses them, a rerun of prepare.py repairs them
# ---------------------------------------------------------------------------

# train.py's first calls into the harness: the tokenizer, the token byte lengths, a first training batch
TRAIN_START = """
import prepare
tok = prepare.Tokenizer.from_directory()
prepare.get_token_bytes()
x, y, _ = next(prepare.make_dataloader(tok, 4, 64, "train", device="cpu"))
print("max id", int(max(x.max(), y.max())), "vocab", tok.get_vocab_size())
"""


def same_size_parquet(path, docs):
    """A valid parquet file of `docs` and one document of padding, exactly the size of `path`."""
    new = path.with_suffix(".new")

    def write(pad):
        pq.write_table(pa.table({"text": docs + ["x" * pad]}), new, compression="none", use_dictionary=False,
                       write_statistics=False)   # uncompressed: one more byte of padding, one more byte of file
        return new.stat().st_size

    pad = path.stat().st_size - write(0)
    for p in range(max(0, pad - 8), pad + 8):
        if write(p) == path.stat().st_size:
            return new.replace(path)
    raise AssertionError("no padding gives the same size")


def active_root(cache):
    """The directory holding the tiny cache's data/, tokenizer/ and tokens/."""
    return next(cache.rglob("tokenizer.json")).parent.parent


def apply_fault(fault, root, tokens):
    if fault == "tokenizer_edited":   # one character of one merge
        path = root / "tokenizer" / "tokenizer.json"
        text = path.read_text()
        i = text.index('"mergeable_ranks": ["') + len('"mergeable_ranks": ["') + 1
        path.write_text(text[:i] + ("B" if text[i] != "B" else "C") + text[i + 1:])
    elif fault == "token_bytes_doubled":
        path = root / "tokenizer" / "token_bytes.npy"
        np.save(path, np.load(path) * 2)
    elif fault == "token_file_out_of_range":   # overwritten in place: same size, ids beyond the vocabulary
        path = tokens / "shard_00000.tokens.npy"
        np.save(path, np.full_like(np.load(path), 9000))
    elif fault == "val_rows_truncated":
        path = next(tokens.glob("val_rows_T2048_N10240*.npy"))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif fault == "val_shard_replaced":   # by another valid shard of the same size
        path = root / "data" / "shard_06542.parquet"
        same_size_parquet(path, make_documents(60, seed=4242))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["tokenizer_edited", "token_bytes_doubled", "token_file_out_of_range",
                                   "val_rows_truncated", "val_shard_replaced"])
def test_a_damaged_cache_is_refused_by_train_and_repaired_by_prepare(tiny_cache, tmp_path, fault):
    cache = shutil.copytree(tiny_cache, tmp_path / "cache")
    corpus = tiny_cache.parent / "corpus"
    root = active_root(cache)
    clean = tree(cache)
    tokens = next((root / "tokens").iterdir())
    path = apply_fault(fault, root, tokens)
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache)}
    start = subprocess.run([sys.executable, "-c", TRAIN_START], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    if fault == "token_file_out_of_range":   # the run goes on, with the shard tokenized afresh, and says so
        assert start.returncode == 0, start.stderr
        assert "max id" in start.stdout and int(start.stdout.split()[2]) < 8192
        assert "holds ids beyond the vocabulary" in start.stderr and path.name in start.stderr
    else:
        fails_in_one_line(start, f"{path.name} does not match its record", "prepare.py")
    result = run_prepare(cache, "--source", str(corpus))
    assert result.returncode == 0, result.stderr
    assert tree(cache) == clean   # byte for byte what the clean build wrote

# ---------------------------------------------------------------------------
# One writer at a time
# ---------------------------------------------------------------------------


def hold_lock(cache, kind):
    """Take the cache's lock in this test process, as a train.py run (shared) or a prepare.py (exclusive) does."""
    fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, kind)
    return fd


@pytest.mark.slow
def test_prepare_waits_while_a_run_reads_the_cache(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_train_shards=2, docs_per_shard=400)
    cache = tmp_path / "cache"
    cache.mkdir()
    reader = hold_lock(cache, fcntl.LOCK_SH)
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--source", str(corpus)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("cache: ")
        assert proc.stdout.readline().startswith(f"waiting for the cache {cache}")
        assert not (cache / "sources").exists()   # nothing written while the reader holds the cache
    finally:
        os.close(reader)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "tokenizer: trained 8192 tokens" in out


@pytest.mark.slow
def test_a_run_refuses_to_start_while_prepare_writes(tiny_cache, tmp_path):
    cache = shutil.copytree(tiny_cache, tmp_path / "cache")
    writer = hold_lock(cache, fcntl.LOCK_EX)
    try:
        env = {**os.environ, "AUTORESEARCH_CACHE": str(cache)}
        start = subprocess.run([sys.executable, "-c", TRAIN_START], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=300)
    finally:
        os.close(writer)
    fails_in_one_line(start, "a prepare.py is writing the cache")

# ---------------------------------------------------------------------------
# Failure paths: orphans, a full disk, an optional cache write, too many files
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_orphaned_temporary_files_are_removed_on_the_next_run(tiny_cache, tmp_path):
    cache = shutil.copytree(tiny_cache, tmp_path / "cache")
    corpus = tiny_cache.parent / "corpus"
    root = active_root(cache)
    clean = tree(cache)
    tokens = next((root / "tokens").iterdir())
    orphans = [root / "data" / ".shard_00001.parquet.4242.tmp", tokens / ".val_rows_T2048_N10240.npy.4242.tmp",
               root / "tokenizer" / ".tokenizer.json.4242.tmp"]   # what a kill mid-write leaves
    for orphan in orphans:
        orphan.write_bytes(b"half a file")
    result = run_prepare(cache, "--source", str(corpus))
    assert result.returncode == 0, result.stderr
    assert tree(cache) == clean


def test_more_source_files_than_shard_names_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_shard(corpus / "doc.parquet", make_documents(3, seed=1))
    for i in range(6543):   # 6,541 training shard names + the test and validation shards: one file too many
        os.link(corpus / "doc.parquet", corpus / f"part-{i:05d}.parquet")
    result = run_prepare(tmp_path / "cache", "--source", str(corpus))
    fails_in_one_line(result, "6542 training files, more than the 6541 shard names")
    assert not list((tmp_path / "cache").rglob("*.parquet"))


@pytest.fixture
def small_disk(tmp_path):
    """A 400 kB tmpfs: a disk that fills up for real (mounting needs root; skipped without it)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file_and_the_space(small_disk, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_train_shards=3, docs_per_shard=400)   # ~185 kB a shard
    result = run_prepare(small_disk / "cache", "--source", str(corpus))
    line = fails_in_one_line(result, "no space left on the device for ")
    assert re.search(r"/shard_\d{5}\.parquet \(0\.\d MB needed, 0\.\d MB free\): free some space", line)
    assert not list((small_disk / "cache").rglob("*.tmp"))


def test_failing_to_cache_the_validation_rows_never_stops_a_run(harness, tmp_path, monkeypatch, capsys):
    """train.py's start-up (TRAIN_START), in this process, on a copy of the cache where no cache file can be written."""
    point_harness_at(harness, shutil.copytree(harness.CACHE_DIR, tmp_path / "cache"), monkeypatch)
    tokens = next((harness.DATA_DIR.parent / "tokens").iterdir())
    shutil.rmtree(tokens)
    tokens.write_text("a file where the token cache's directory should be")
    tok = harness.Tokenizer.from_directory()
    harness.get_token_bytes()
    next(harness.make_dataloader(tok, 4, 64, "train", device="cpu"))
    assert harness.validation_rows(tok, 64, 7).shape == (7, 65)
    assert "note: val_rows_T64_N7.npy is not cached" in capsys.readouterr().out
