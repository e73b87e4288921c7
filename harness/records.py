"""
The cache's records: every cache file has one beside it (NAME.sha256.json: its sha256, its size and what it was
made from: source shard, tokenizer, settings, by content), written right after the file. A file whose record is
missing or does not match is never used: prepare.py rebuilds it; train.py refuses, or falls back to the source.
Also here: atomic writes, and the lock that keeps a prepare.py from rewriting the cache under a run.
"""

import base64
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from harness.datasets import TEST_FILENAME, VAL_FILENAME, read_source
from harness.errors import HarnessError


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_path(path):
    return Path(path).with_name(Path(path).name + ".sha256.json")


def read_record(path, made_from=None, full=True):
    """
    The record of a cache file if the file matches it, else None. `made_from`, if given, must equal what the
    file was made from; `full` compares the content's sha256, else only the size (big files at train time).
    """
    try:
        record = json.loads(record_path(path).read_text())
        if made_from is not None and record["made_from"] != made_from:
            return None
        if Path(path).stat().st_size != record["size"] or full and sha256(path) != record["sha256"]:
            return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mismatch(path):
    return (f"{path} does not match its record (edited, damaged, or written by an older prepare.py): run "
            f"`uv run prepare.py` (with the same --source or --dataset) to repair the cache; no val_bpb is reported")


def shard_sha256(path, full=True):
    """A data shard's content hash, from its record once the file is checked against it."""
    record = read_record(path, full=full)
    if record is None:
        raise HarnessError(mismatch(path))
    return record["sha256"]


def packed_rows_file(shard, tokenizer_id, T, n_rows):
    """Where a dataset caches the packed rows of a one-shard split (validation: val_rows_..., test: test_rows_...),
    and what they are made from (by content)."""
    split = "val" if Path(shard).name == VAL_FILENAME else "test"
    made_from = {"shard": shard_sha256(shard), "tokenizer": tokenizer_id, "T": T, "rows": n_rows}
    return Path(shard).parent.parent / "tokens" / tokenizer_id / f"{split}_rows_T{T}_N{n_rows}.npy", made_from


def check_metric_files(tokenizer_dir, cache_dir, T, n_rows, all_files=True):
    """
    The saved tokenizer's metadata and sha256, under a shared lock on the cache (lock_cache), once tokenizer.json
    matches its record and (`all_files`) so do the files the metric depends on: token byte lengths, the
    validation and test shards and their rows of T + 1 tokens (n_rows, and a quarter as many). A run refuses in
    one line, before training, to report a val_bpb from files that do not.
    """
    lock_cache(cache_dir, exclusive=False)
    path = tokenizer_dir / "tokenizer.json"
    try:
        raw = path.read_bytes()
    except OSError:
        raise HarnessError(f"no tokenizer in {tokenizer_dir}: run `uv run prepare.py`") from None
    sha = hashlib.sha256(raw).hexdigest()
    record = read_record(path, full=False)
    try:
        if record is None or record["sha256"] != sha:
            raise ValueError
        meta = json.loads(raw)
    except ValueError:
        raise HarnessError(mismatch(path)) from None
    token_bytes = tokenizer_dir / "token_bytes.npy"
    if all_files and token_bytes.exists() and read_record(token_bytes, {"tokenizer": sha}) is None:
        raise HarnessError(mismatch(token_bytes))
    for shard, n in ((VAL_FILENAME, n_rows), (TEST_FILENAME, max(1, n_rows // 4))):
        if all_files and (tokenizer_dir.parent / "data" / shard).exists():
            rows, made_from = packed_rows_file(tokenizer_dir.parent / "data" / shard, sha[:16], T, n)
            if rows.exists() and read_record(rows, made_from) is None:
                raise HarnessError(mismatch(rows))
    return meta, sha


def checked_token_bytes(tokenizer_dir):
    """token_bytes.npy, once it matches its record, was made from the tokenizer beside it, and holds the byte lengths
    of that tokenizer's tokens, recomputed here: a file rewritten together with its record still does not pass."""
    path = tokenizer_dir / "token_bytes.npy"
    if not path.exists():
        raise HarnessError(f"no token byte lengths at {path}: run `uv run prepare.py`")
    tokenizer = read_record(path.with_name("tokenizer.json"))
    if tokenizer is None or read_record(path, {"tokenizer": tokenizer["sha256"]}) is None:
        raise HarnessError(mismatch(path))
    try:
        token_bytes = np.load(path, allow_pickle=False)
        ranks = json.loads(path.with_name("tokenizer.json").read_text())["mergeable_ranks"]
    except (OSError, ValueError, KeyError):
        raise HarnessError(mismatch(path)) from None
    lengths = np.zeros_like(token_bytes)   # special tokens carry no bytes
    lengths[:len(ranks)] = [len(base64.b64decode(rank)) for rank in ranks]
    if not np.array_equal(token_bytes, lengths):
        raise HarnessError(f"{path} does not hold the byte lengths of the tokenizer's tokens (rewritten?): run "
                           f"`uv run prepare.py` to rebuild it; no val_bpb is reported")
    return token_bytes

# ---------------------------------------------------------------------------
# Writing the cache: atomically, each file followed by its record
# ---------------------------------------------------------------------------


class DiskFull(HarnessError):
    """A cache write ran out of space: one line naming the file and the space it needs."""


def atomic_write(path, write, needed=None):
    """write(tmp_path), then rename: a crash never leaves a half-written file at `path` (`needed`: its bytes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno != errno.ENOSPC and "No space left" not in str(e):   # pyarrow's errors may carry no errno
            raise
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        raise DiskFull(f"no space left on the device for {path} ({f'{needed / 1e6:.1f} MB needed, ' if needed else ''}"
                       f"{free / 1e6:.1f} MB free): free some space, or set AUTORESEARCH_CACHE to a larger disk, "
                       f"and run the same command again") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path, array=None, **arrays):
    """np.save / np.savez to exactly `path` (given a name, numpy would append its own suffix)."""
    with open(path, "wb") as f:
        if array is not None:
            np.save(f, array, allow_pickle=False)
        else:
            np.savez(f, **arrays)


def write_record(path, made_from, **facts):
    record = dict(sha256=sha256(path), size=Path(path).stat().st_size, made_from=made_from, **facts)
    atomic_write(record_path(path), lambda tmp: tmp.write_text(json.dumps(record, sort_keys=True) + "\n"))
    return record


def write_cache_file(path, write, made_from, needed=None, **facts):
    """write(tmp) into place atomically, then the record; a crash in between leaves a file with no record."""
    record_path(path).unlink(missing_ok=True)
    atomic_write(path, write, needed)
    return write_record(path, made_from, **facts)


_held_locks = {}   # lock file -> its descriptor: held until the process exits


def lock_cache(cache_dir, exclusive):
    """
    One writer at a time: prepare.py holds CACHE_DIR/.lock exclusively while it writes; a reader (train.py, from
    loading the tokenizer through evaluation) holds it shared. A writer waits for readers, saying so; a reader
    started while a writer works refuses in one line. Once per process and cache; nothing to lock if no cache.
    """
    import fcntl
    path = Path(cache_dir) / ".lock"
    if path in _held_locks:
        return
    if exclusive:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if exclusive:
            raise
        return   # no cache here (or a read-only one): nothing a prepare.py could be writing
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        if not exclusive:
            os.close(fd)
            raise HarnessError(f"a prepare.py is writing the cache {cache_dir}: run again once it has finished")
        print(f"waiting for the cache {cache_dir}: a train.py run or another prepare.py is using it", flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    _held_locks[path] = fd


def write_source(data_dir, **info):
    """source.json beside a data directory: where its shards come from ({"dataset": name, ...})."""
    atomic_write(Path(data_dir).with_name("source.json"), lambda tmp: tmp.write_text(json.dumps(info)))


def claim(data_dir, name):
    """A data directory holds shards of one source only: those of any other are deleted before it is filled."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if read_source(data_dir).get("dataset") != name:
        for old in data_dir.glob("shard_*.parquet"):
            old.unlink()
            record_path(old).unlink(missing_ok=True)
        write_source(data_dir, dataset=name)


def cache_packed_rows(path, rows, made_from):
    """Cache packed validation or test rows for the next run; only an optimisation: a failure is a note."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_cache_file(path, lambda tmp: save_npy(tmp, rows), made_from, rows.nbytes)
    except (OSError, DiskFull) as e:
        why = e.code if isinstance(e, DiskFull) else f"{type(e).__name__}: {e}"
        print(f"note: {path.name} is not cached ({why}); it is packed again next time")
