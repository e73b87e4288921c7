"""
The rest of the frozen harness: what `uv run prepare.py` does, and what prepare.py calls at run time.

    uv run prepare.py                      # default dataset: 10 training shards + validation
    uv run prepare.py --num-shards 50      # more training data (-1 = all 6,542 shards)
    uv run prepare.py --source DIR         # local parquet files with a `text` column, no download
    uv run prepare.py --dataset NAME       # any Hugging Face text dataset (or a local directory of files)
    uv run prepare.py --smoke              # the current train.py at toy size, to its summary block

It downloads or converts the data, trains the BPE tokenizer and fills the token cache, writing a record beside
every cache file; at run time it checks the files against their records, holds the cache lock, reads the token
cache, and provides the attention kernels (Flash Attention 3 fetched and checked, or the PyTorch fallback).
prepare.py, which train.py imports, is what the agent reads; this file is frozen with it and never needs to be
read to run a night. It imports prepare.py; prepare.py imports it only inside functions.
"""

import argparse
import base64
import collections
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import prepare
from prepare import (DATASET_REPO, MAX_SHARD, SPECIAL_TOKENS, VAL_FILENAME, HarnessError, Tokenizer,
                     _encoding_from_meta, dataset_name, dataset_root, list_shards, read_source, tokenize_shard)

# CACHE_DIR, DATA_DIR, TOKENIZER_DIR, DATASET and the metric constants are read as prepare.NAME where they are
# used: the command line points them at the dataset it builds, and the tests shrink them.

# GPT-4's pre-tokenizer with \p{N}{1,2} instead of \p{N}{1,3}
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")
TOKENIZER_MAX_DOC_CHARS = 10_000         # each document is capped at this many characters
TOKENIZER_MAX_CHARS = 1_000_000_000      # characters of training text in all
TOKEN_CACHE_SHARDS = 64                  # training shards tokenized at prepare time; later ones on the fly
SHARD_DOCS = 100_000                     # --dataset: documents per shard written, at most
SHARD_CHARS = 250_000_000                # --dataset: characters per shard, at most (long documents)
ROW_GROUP_DOCS = 1024                    # --dataset: documents per parquet row group
HOLDOUT_DOCS = 50_000                    # --dataset validation: its validation split, or else 1% of train held out,
HOLDOUT_CHARS = 100_000_000              #   at most this many documents and characters

# ---------------------------------------------------------------------------
# Records: every cache file has one beside it (NAME.sha256.json: its sha256, its size and what it was made
# from: source shard, tokenizer, settings, by content), written right after the file. A file whose record is
# missing or does not match is never used: prepare.py rebuilds it; train.py refuses, or falls back to the source.
# ---------------------------------------------------------------------------


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_path(path):
    return Path(path).with_name(Path(path).name + ".sha256.json")


def read_record(path, made_from=None, full=True):
    """
    The record of a cache file if the file matches it, else None. `made_from`, if given, must equal what the
    file was made from; `full` compares the content's sha256, else only the size (big files at train time).
    """
    try:
        record = json.loads(_record_path(path).read_text())
        if made_from is not None and record["made_from"] != made_from:
            return None
        if Path(path).stat().st_size != record["size"] or full and _sha256(path) != record["sha256"]:
            return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _mismatch(path):
    return (f"{path} does not match its record (edited, damaged, or written by an older prepare.py): run "
            f"`uv run prepare.py` (with the same --source or --dataset) to repair the cache; no val_bpb is reported")


def _shard_sha256(path, full=True):
    """A data shard's content hash, from its record once the file is checked against it."""
    record = read_record(path, full=full)
    if record is None:
        raise HarnessError(_mismatch(path))
    return record["sha256"]


def validation_rows_file(root, tokenizer_id, T, n_rows):
    """Where a dataset root caches its packed validation rows, and what they are made from (by content)."""
    shard = _shard_sha256(root / "data" / VAL_FILENAME)
    made_from = {"shard": shard, "tokenizer": tokenizer_id, "T": T, "rows": n_rows}
    return root / "tokens" / tokenizer_id / f"val_rows_T{T}_N{n_rows}.npy", made_from


def check_metric_files(tokenizer_dir, all_files=True):
    """
    The saved tokenizer's metadata and sha256, under a shared lock on the cache (lock_cache), once tokenizer.json
    matches its record and (`all_files`) so do the files the metric depends on: token byte lengths, validation
    shard and rows. A run refuses in one line, before training, to report a val_bpb from files that do not.
    """
    lock_cache(exclusive=False)
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
        raise HarnessError(_mismatch(path)) from None
    token_bytes = tokenizer_dir / "token_bytes.npy"
    if all_files and token_bytes.exists() and read_record(token_bytes, {"tokenizer": sha}) is None:
        raise HarnessError(_mismatch(token_bytes))
    if all_files and (tokenizer_dir.parent / "data" / VAL_FILENAME).exists():
        n_rows = prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN
        rows, made_from = validation_rows_file(tokenizer_dir.parent, sha[:16], prepare.MAX_SEQ_LEN, n_rows)
        if rows.exists() and read_record(rows, made_from) is None:
            raise HarnessError(_mismatch(rows))
    return meta, sha


def checked_token_bytes(tokenizer_dir):
    """token_bytes.npy, once it matches its record and was made from the tokenizer beside it."""
    path = tokenizer_dir / "token_bytes.npy"
    if not path.exists():
        raise HarnessError(f"no token byte lengths at {path}: run `uv run prepare.py`")
    tokenizer = read_record(path.with_name("tokenizer.json"))
    if tokenizer is None or read_record(path, {"tokenizer": tokenizer["sha256"]}) is None:
        raise HarnessError(_mismatch(path))
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        raise HarnessError(_mismatch(path)) from None

# ---------------------------------------------------------------------------
# Writing the cache: atomically, each file followed by its record
# ---------------------------------------------------------------------------


def shard_name(index):
    return f"shard_{index:05d}.parquet"


class DiskFull(HarnessError):
    """A cache write ran out of space: one line naming the file and the space it needs."""


def _atomic_write(path, write, needed=None):
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


def _save_npy(path, array=None, **arrays):
    """np.save / np.savez to exactly `path` (given a name, numpy would append its own suffix)."""
    with open(path, "wb") as f:
        if array is not None:
            np.save(f, array, allow_pickle=False)
        else:
            np.savez(f, **arrays)


def _write_record(path, made_from, **facts):
    record = dict(sha256=_sha256(path), size=Path(path).stat().st_size, made_from=made_from, **facts)
    _atomic_write(_record_path(path), lambda tmp: tmp.write_text(json.dumps(record, sort_keys=True) + "\n"))
    return record


def _write_cache_file(path, write, made_from, needed=None, **facts):
    """write(tmp) into place atomically, then the record; a crash in between leaves a file with no record."""
    _record_path(path).unlink(missing_ok=True)
    _atomic_write(path, write, needed)
    return _write_record(path, made_from, **facts)


_held_locks = {}   # lock file -> its descriptor: held until the process exits


def lock_cache(exclusive):
    """
    One writer at a time: prepare.py holds CACHE_DIR/.lock exclusively while it writes; a reader (train.py, from
    loading the tokenizer through evaluation) holds it shared. A writer waits for readers, saying so; a reader
    started while a writer works refuses in one line. Once per process and cache; nothing to lock if no cache.
    """
    import fcntl
    path = prepare.CACHE_DIR / ".lock"
    if path in _held_locks:
        return
    if exclusive:
        prepare.CACHE_DIR.mkdir(parents=True, exist_ok=True)
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
            raise HarnessError(f"a prepare.py is writing the cache {prepare.CACHE_DIR}: run again once it has finished")
        print(f"waiting for the cache {prepare.CACHE_DIR}: a train.py run or another prepare.py is using it",
              flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    _held_locks[path] = fd


def cache_validation_rows(path, rows, made_from):
    """Cache the packed validation rows for the next run; only an optimisation: a failure is a note, not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_cache_file(path, lambda tmp: _save_npy(tmp, rows), made_from, rows.nbytes)
    except (OSError, DiskFull) as e:
        why = e.code if isinstance(e, DiskFull) else f"{type(e).__name__}: {e}"
        print(f"note: the validation rows are not cached ({why}); they are packed again next time")


def check_shard(path):
    """Raise HarnessError unless `path` is a readable parquet file with a non-empty `text` column."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise HarnessError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
    field = pf.schema_arrow.field("text") if "text" in pf.schema_arrow.names else None
    if field is None or str(field.type) not in ("string", "large_string"):
        raise HarnessError(f"{path} has no string column named 'text' (columns: {pf.schema_arrow.names})")
    if pf.metadata.num_rows == 0:
        raise HarnessError(f"{path} has no rows")
    return pf.metadata.num_rows


def _write_source(data_dir, **info):
    _atomic_write(Path(data_dir).with_name("source.json"), lambda tmp: tmp.write_text(json.dumps(info)))


def _claim(data_dir, name):
    """A data directory holds shards of one source only: those of any other are deleted before it is filled."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if read_source(data_dir).get("dataset") != name:
        for old in data_dir.glob("shard_*.parquet"):
            old.unlink()
            _record_path(old).unlink(missing_ok=True)
        _write_source(data_dir, dataset=name)

# ---------------------------------------------------------------------------
# Data: download from the Hugging Face hub, or copy from a local directory
# ---------------------------------------------------------------------------


def _network_hint(repo=DATASET_REPO):
    from huggingface_hub import constants
    return (f"cannot download {repo} from {constants.ENDPOINT}: check the network, set HF_ENDPOINT to a "
            f"reachable mirror (and HF_TOKEN if it needs one), or use local parquet files with "
            f"`uv run prepare.py --source DIR`")


def first_line(e):
    return " ".join(f"{type(e).__name__}: {e}".split())


def _connect_error(endpoint, timeout):
    """Why one TCP connection to the endpoint fails (seconds, where the hub client retries for a minute), or None."""
    import socket
    from urllib.parse import urlsplit
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return str(e)
    return None


def _check_reachable(repo=DATASET_REPO):
    """Fail in seconds, not after the hub client's minute of retries, when the endpoint cannot be reached."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise HarnessError(f"{_network_hint(repo)} (HF_HUB_OFFLINE is set and shards are missing)")
    error = _connect_error(constants.ENDPOINT, timeout=5.0)
    if error:
        raise HarnessError(f"{_network_hint(repo)} ({error})")


# A transfer that receives less than STALL_BYTES in STALL_SECONDS fails (the hub client alone waits ~6.5 minutes
# for a hub that never answers, and forever for one that trickles); with output that is not a terminal, a progress
# line every PROGRESS_SECONDS. The variables exist for the tests.
STALL_SECONDS = float(os.environ.get("AUTORESEARCH_STALL_SECONDS") or 60)
STALL_BYTES = 1 << 20
PROGRESS_SECONDS = float(os.environ.get("AUTORESEARCH_PROGRESS_SECONDS") or 30)


class _Transfers:
    """What each download thread is fetching and when it last made progress; bytes and shards done in all."""

    def __init__(self, total):
        self.lock, self.active, self.total = threading.Lock(), {}, total
        self.done = self.bytes = 0
        self.t0 = time.monotonic()

    def start(self, name):
        with self.lock:
            self.active[threading.get_ident()] = [name, time.monotonic(), 0]

    def finish(self, ok):
        with self.lock:
            self.active.pop(threading.get_ident(), None)
            self.done += ok

    def received(self, n):
        with self.lock:
            self.bytes += n
            transfer = self.active.get(threading.get_ident())
            if transfer is not None:
                transfer[2] += n
                if transfer[2] >= STALL_BYTES:   # progress: the clock starts again
                    transfer[1:] = [time.monotonic(), 0]

    def watch(self, stop, show_progress):
        """Until `stop` is set: a progress line when due; the process ends in one line if a transfer stalls."""
        last_line = time.monotonic()
        while not stop.wait(min(1.0, PROGRESS_SECONDS, STALL_SECONDS)):
            now = time.monotonic()
            if show_progress and now - last_line >= PROGRESS_SECONDS:
                mb = self.bytes / 1e6
                print(f"downloading: {self.done}/{self.total} shards, {mb:.1f} MB, {mb / (now - self.t0):.2f} MB/s",
                      flush=True)
                last_line = now
            with self.lock:
                stalled = [name for name, since, _ in self.active.values() if now - since >= STALL_SECONDS]
            if stalled:
                print(f"prepare.py: downloading {stalled[0]} made no progress for {STALL_SECONDS:.0f}s (less than "
                      f"{STALL_BYTES >> 20} MiB): check the network (or HF_ENDPOINT) and run the same command "
                      f"again; complete shards are kept", file=sys.stderr, flush=True)
                os._exit(1)   # the stalled thread cannot be interrupted; nothing half-written is ever trusted


def _count_bytes(transfers):
    """Have the hub client's HTTP session report every byte it receives to `transfers`."""
    import httpx2
    from huggingface_hub import get_session

    class Counted(httpx2.SyncByteStream):
        def __init__(self, stream):
            self.stream = stream

        def __iter__(self):
            for chunk in self.stream:
                transfers.received(len(chunk))
                yield chunk

        def close(self):
            self.stream.close()

    def hook(response):
        response.stream = Counted(response.stream)

    session = get_session()
    hooks = session.event_hooks
    hooks["response"] = [*hooks.get("response", []), hook]
    session.event_hooks = hooks


def _download_shard(name, data_dir, transfers):
    """Fetch one shard with the hub client, which renames the file into place only when it is complete."""
    transfers.start(name)
    ok = False
    try:
        _fetch_shard(name, data_dir)
        ok = True
    finally:
        transfers.finish(ok)


def _fetch_shard(name, data_dir):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError
    path = data_dir / name
    for _ in range(2):
        try:
            hf_hub_download(DATASET_REPO, name, repo_type="dataset", revision="main", local_dir=data_dir)
        except RemoteEntryNotFoundError:
            raise HarnessError(f"{DATASET_REPO} has no file {name} (is --num-shards too large?)") from None
        except LocalEntryNotFoundError as e:   # the client's word for "could not reach the hub", or HF_HUB_OFFLINE
            raise HarnessError(f"{_network_hint()} ({name}: {e.__cause__ or e})") from None
        except Exception as e:   # a transfer cut short: nothing is left under the final name
            raise HarnessError(f"downloading {name} failed ({type(e).__name__}: {e}): run the same command "
                               f"again to fetch what is missing") from None
        try:
            check_shard(path)
            _write_record(path, {"repo": DATASET_REPO, "file": name})
            return path
        except HarnessError:
            path.unlink(missing_ok=True)   # a corrupt file: fetch it once more from scratch
    raise HarnessError(f"downloaded {name} twice and it is still not a valid parquet file; try again later")


def download_data(num_shards, workers, data_dir=None):
    """Download the validation shard and the first `num_shards` training shards. Returns (fetched, present)."""
    from concurrent.futures import ThreadPoolExecutor
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")   # read when huggingface_hub is first imported
    from huggingface_hub.utils import disable_progress_bars
    from tqdm import tqdm
    data_dir = Path(data_dir or prepare.DATA_DIR)
    data_dir.mkdir(parents=True, exist_ok=True)
    for orphan in (data_dir / ".cache" / "huggingface" / "download").glob("*.incomplete"):
        orphan.unlink()   # left by a killed download; the hub client never resumes these
    n_train = MAX_SHARD if num_shards < 0 else min(num_shards, MAX_SHARD)
    wanted = [VAL_FILENAME] + [shard_name(i) for i in range(n_train)]
    ours = read_source(data_dir).get("dataset") == DATASET_REPO   # else _claim deletes what is there
    missing = []
    for name in wanted:
        path = data_dir / name
        if ours and read_record(path, {"repo": DATASET_REPO, "file": name}):
            continue
        if ours and _record_path(path).exists():
            path.unlink(missing_ok=True)   # not what was downloaded: fetch it again
        missing.append(name)
    if missing:
        _check_reachable()   # before _claim: no network, nothing deleted
    _claim(data_dir, DATASET_REPO)
    if not missing:
        return 0, len(wanted)
    disable_progress_bars()
    transfers, stop = _Transfers(len(missing)), threading.Event()
    _count_bytes(transfers)
    watchdog = threading.Thread(target=transfers.watch, args=(stop, not sys.stdout.isatty()), daemon=True)
    watchdog.start()
    try:
        with tqdm(total=len(missing), desc="downloading shards", unit="shard", disable=None) as bar:   # a terminal's
            _download_shard(missing[0], data_dir, transfers)   # one first, so that a dead network fails fast, once
            bar.update()
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for _ in pool.map(lambda n: _download_shard(n, data_dir, transfers), missing[1:]):
                    bar.update()
    finally:
        stop.set()
    return len(missing), len(wanted) - len(missing)


def check_source(source):
    """A --source directory, resolved; one inside the cache is refused (filling from it would delete it)."""
    source = Path(source)
    if not source.is_dir():
        raise HarnessError(f"--source {source} is not a directory")
    source, cache = source.resolve(), prepare.CACHE_DIR.resolve()
    if source == cache or cache in source.parents:
        raise HarnessError(f"--source {source} is inside the cache {cache}: give a directory of your own parquet files")
    return source


def copy_source(source, data_dir=None):
    """Mirror a directory of parquet files into the cache under canonical shard names, verified by content."""
    source, data_dir = check_source(source), Path(data_dir or prepare.DATA_DIR)
    files = sorted(source.glob("*.parquet"))
    if len(files) < 2:
        raise HarnessError(f"--source {source} needs at least 2 parquet files (training + validation), "
                           f"found {len(files)}")
    val = next((f for f in files if f.name == VAL_FILENAME), files[-1])
    train = [f for f in files if f != val]
    if len(train) > MAX_SHARD:
        raise HarnessError(f"--source {source} has {len(train)} training files, more than the {MAX_SHARD} shard names "
                           f"(shard_00000 ... shard_{MAX_SHARD - 1:05d}): use at most {MAX_SHARD + 1} files")
    plan = {VAL_FILENAME: val, **{shard_name(i): f for i, f in enumerate(train)}}
    for src in plan.values():
        check_shard(src)
    _claim(data_dir, f"local:{source}")
    for stale in data_dir.glob("shard_*.parquet"):
        if stale.name not in plan:
            stale.unlink()
            _record_path(stale).unlink(missing_ok=True)
    copied = 0
    for name, src in plan.items():
        made_from = {"source": str(src), "sha256": _sha256(src)}
        if read_record(data_dir / name, made_from):
            continue
        _write_cache_file(data_dir / name, lambda tmp: shutil.copyfile(src, tmp), made_from, src.stat().st_size)
        copied += 1
    return len(train), val.name, copied


def _texts(rows, name, column):
    """The non-empty strings of one column of a streamed split; a missing column fails naming those there are."""
    def missing(columns):
        return HarnessError(f"{name} has no column {column!r} (columns: {', '.join(columns)}): "
                            f"name its text column with --text-column COL")

    if rows.column_names and column not in rows.column_names:
        # Known from the schema (parquet): fail before reading any row. Exiting right after reading the first rows
        # of a streamed parquet split aborts about one run in ten ("terminate called without an active exception",
        # exit -6): its pyarrow scan is torn down at interpreter exit, as in apache/arrow#45214, which `datasets`
        # works around only for pyarrow <= 24.
        raise missing(rows.column_names)
    if rows.column_names:
        rows = rows.select_columns([column])   # stream only the text
    for row in rows:
        if column not in row:
            raise missing(row)
        if isinstance(row[column], str) and row[column]:
            yield row[column]


def _hold_out_last(docs, held):
    """Yield all documents but the last 1% (at least 1, at most HOLDOUT_DOCS / _CHARS), which go into `held`."""
    tail, chars, n = collections.deque(), 0, 0
    for doc in docs:
        tail.append(doc)
        chars, n = chars + len(doc), n + 1
        while len(tail) > 1 and (len(tail) > HOLDOUT_DOCS or chars > HOLDOUT_CHARS):
            chars -= len(tail[0])
            yield tail.popleft()
    while len(tail) > max(1, n // 100):
        yield tail.popleft()
    held.extend(tail)


def _chunks(docs, max_docs, max_chars):
    """Lists of consecutive documents, each closed at max_docs documents or max_chars characters."""
    chunk, chars = [], 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _write_docs(path, docs, made_from):
    table = pa.table({"text": pa.array(docs, pa.string())})
    _write_cache_file(path, lambda tmp: pq.write_table(table, tmp, row_group_size=ROW_GROUP_DOCS,
                                                       compression="zstd"), made_from)


def _converted(data_dir, done):
    """Whether data_dir holds exactly the shards of the conversion recorded in `done`, each matching its record."""
    made_from = {"dataset": done.get("dataset"), "text_column": done.get("text_column")}
    shards = sorted(data_dir.glob("shard_*.parquet"))
    return (len(shards) == done.get("train_shards", -1) + 1
            and all(read_record(p, made_from) for p in shards))


def convert_dataset(name, column="text", data_dir=None):
    """
    Stream a `datasets` dataset into shards: its validation split ("validation", "valid" or "test"; else the
    last documents of train) becomes the pinned validation shard. Returns (source.json, whether converted now).
    """
    data_dir = Path(data_dir or prepare.DATA_DIR)
    done = read_source(data_dir)
    if (done.get("dataset"), done.get("text_column")) == (name, column) and _converted(data_dir, done):
        return done, False
    if not Path(name).is_dir():
        _check_reachable(name)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ["USE_TORCH"] = "0"   # datasets would import torch (~4 s) for tensor formats a conversion never uses
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)   # its errors reach the user in our one line
    try:
        splits = datasets.load_dataset(name, streaming=True)
    except Exception as e:
        raise HarnessError(f"cannot load dataset {name} ({first_line(e)[:300]}): check the name; for the hub set "
                           f"HF_ENDPOINT (and HF_TOKEN if it needs one), or use local parquet files with --source DIR"
                           ) from None
    train = "train" if "train" in splits else next(iter(splits)) if len(splits) == 1 else None
    if train is None:
        raise HarnessError(f"{name} has no 'train' split (splits: {', '.join(splits)})")
    val = next((s for s in ("validation", "valid", "test") if s in splits and s != train), None)
    staging = data_dir.with_name("data.partial")   # becomes data_dir once complete: a crash leaves nothing trusted
    made_from = {"dataset": name, "text_column": column}
    try:
        val_docs = next(_chunks(_texts(splits[val], name, column), HOLDOUT_DOCS, HOLDOUT_CHARS), []) if val else []
        docs = _texts(splits[train], name, column)
        first = next(docs, None)   # a missing column or an empty dataset fails before anything is written
        if first is None:
            raise HarnessError(f"{name} has no documents in its {train!r} split (column {column!r})")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        docs = itertools.chain([first], docs)
        if not val_docs:
            val, docs = None, _hold_out_last(docs, val_docs)
        n_shards = n_docs = 0
        for n_shards, chunk in enumerate(_chunks(docs, SHARD_DOCS, SHARD_CHARS), 1):
            _write_docs(staging / shard_name(n_shards - 1), chunk, made_from)
            n_docs += len(chunk)
    except Exception as e:
        raise HarnessError(f"reading {name} failed ({first_line(e)[:300]}); nothing was kept: fix the cause and "
                           f"run the same command again") from None
    if n_shards == 0:
        shutil.rmtree(staging)
        raise HarnessError(f"{name} has only {len(val_docs)} document(s): too few to train on")
    _write_docs(staging / VAL_FILENAME, val_docs, made_from)
    done = dict(dataset=name, text_column=column, train_shards=n_shards, train_docs=n_docs,
                validation=f"split {val!r}" if val else f"last {len(val_docs)} documents of {train!r}",
                validation_docs=len(val_docs))
    data_dir.with_name("source.json").unlink(missing_ok=True)
    shutil.rmtree(data_dir, ignore_errors=True)   # shards of an older conversion are never mixed with these
    os.replace(staging, data_dir)
    _write_source(data_dir, **done)   # written last: marks completion
    return done, True


# ---------------------------------------------------------------------------
# Tokenizer: BPE trained with rustbpe, run with tiktoken
# ---------------------------------------------------------------------------


def _tokenizer_training_text(paths):
    """Training documents in a fixed order, each capped, at most TOKENIZER_MAX_CHARS in all."""
    nchars = 0
    for path in paths:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                doc = (text or "")[:TOKENIZER_MAX_DOC_CHARS]
                if nchars + len(doc) > TOKENIZER_MAX_CHARS:
                    return
                nchars += len(doc)
                yield doc


def _data_fingerprint(paths):
    """What the tokenizer depends on: the settings, the source and its shards' content. Any change: train again."""
    settings = [prepare.VOCAB_SIZE, SPLIT_PATTERN, TOKENIZER_MAX_DOC_CHARS, TOKENIZER_MAX_CHARS]
    return settings + [read_source(paths[0].parent).get("dataset")] + [[p.name, _shard_sha256(p, False)] for p in paths]


def train_tokenizer(data_dir=None, tokenizer_dir=None):
    """Train the BPE on the training shards; save the merges and the token byte lengths. Returns the seconds it
    took, or None if the saved tokenizer is up to date."""
    import rustbpe
    data_dir, tokenizer_dir = Path(data_dir or prepare.DATA_DIR), Path(tokenizer_dir or prepare.TOKENIZER_DIR)
    paths = list_shards("train", data_dir)
    fingerprint = _data_fingerprint(paths)
    meta_path = tokenizer_dir / "tokenizer.json"
    record = read_record(meta_path, fingerprint)
    if record and read_record(tokenizer_dir / "token_bytes.npy", {"tokenizer": record["sha256"]}):
        return None
    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    n_merged = prepare.VOCAB_SIZE - len(SPECIAL_TOKENS)
    bpe.train_from_iterator(_tokenizer_training_text(paths), n_merged, pattern=SPLIT_PATTERN)
    ranks = sorted(bpe.get_mergeable_ranks(), key=lambda kv: kv[1])
    n_ranks = len(ranks)
    if n_ranks != n_merged or [r for _, r in ranks] != list(range(n_ranks)):
        raise HarnessError(f"the training text yields only {n_ranks} of {n_merged} "
                           f"BPE tokens: give prepare.py more training data")
    meta = {
        "pattern": bpe.get_pattern(),
        "special_tokens": {name: n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)},
        "mergeable_ranks": [base64.b64encode(bytes(b)).decode("ascii") for b, _ in ranks],   # index = rank
        "data": fingerprint,
    }
    tokenizer = Tokenizer(_encoding_from_meta(meta))
    text = ("Hello world! Numbers 0, 12, 345 and 6789; punctuation?! (yes) -- tabs\tand\nnewlines. "
            "你好，世界。 Ünïcödé ✓")
    if tokenizer.decode(tokenizer.encode(text)) != text:
        raise HarnessError("the trained tokenizer does not round-trip text: this is a bug, please report it")
    token_bytes = np.zeros(prepare.VOCAB_SIZE, dtype=np.int32)   # special tokens stay 0: they carry no bytes
    token_bytes[:n_ranks] = [len(bytes(b)) for b, _ in ranks]
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    _record_path(tokenizer_dir / "token_bytes.npy").unlink(missing_ok=True)
    record = _write_cache_file(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)), fingerprint)
    _write_cache_file(tokenizer_dir / "token_bytes.npy", lambda tmp: _save_npy(tmp, token_bytes),
                      {"tokenizer": record["sha256"]})   # its record, written last, marks completion
    return time.time() - t0


# ---------------------------------------------------------------------------
# Token cache: the validation shard and the first training shards tokenized once, at prepare time
# ---------------------------------------------------------------------------


def tokens_dir(tokenizer):
    """Token files sit next to the data they come from, one directory per tokenizer."""
    return Path(prepare.DATA_DIR).parent / "tokens" / tokenizer.id if tokenizer.id else None


def cached_tokens(path, tokenizer, full=False):
    """
    A shard's cached (tokens, offsets, batches) for the loader, or None if the cache does not hold this exact file
    for this tokenizer: checked against the records by content when `full` (the validation shard), else by size;
    never an id beyond the vocabulary.
    """
    out = tokens_dir(tokenizer)
    shard = out and read_record(path, full=full)
    made_from = shard and {"shard": shard["sha256"], "tokenizer": tokenizer.id}
    stem = out / path.name.removesuffix(".parquet") if out else None
    record = made_from and read_record(f"{stem}.tokens.npy", made_from, full)
    if not (record and read_record(f"{stem}.index.npz", made_from, full)):
        return None
    try:
        with np.load(f"{stem}.index.npz", allow_pickle=False) as index:
            offsets, batches = index["offsets"], index["batches"]
        # the mapped file seen as a plain array (no copy): the packer slices it twice as fast as a np.memmap
        tokens = np.asarray(np.load(f"{stem}.tokens.npy", mmap_mode="r", allow_pickle=False))
    except (OSError, ValueError, KeyError):
        return None
    if len(tokens) != offsets[-1]:
        return None
    if len(tokens) and max(record["max_id"], int(tokens.max())) >= tokenizer.get_vocab_size():
        print(f"prepare.py: {stem}.tokens.npy holds ids beyond the vocabulary (overwritten or damaged): "
              f"tokenizing {path.name} instead; run `uv run prepare.py` to repair the cache", file=sys.stderr)
        return None
    return tokens, offsets, batches


def cache_tokens(tokenizer, max_train_shards=TOKEN_CACHE_SHARDS):
    """
    Tokenize the validation shard and the first training shards into the cache, each checked by content against
    its record first. Returns how many were written.
    """
    out = tokens_dir(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.iterdir():   # token files of an older tokenizer
        if stale != out:
            shutil.rmtree(stale, ignore_errors=True)
    written = 0
    for path in list_shards("val") + list_shards("train")[:max_train_shards]:
        if cached_tokens(path, tokenizer, full=True) is not None:
            continue
        tokens, offsets, batches = tokenize_shard(path, tokenizer)
        max_id = int(tokens.max()) if len(tokens) else 0
        if max_id >= tokenizer.get_vocab_size():
            raise HarnessError(f"tokenizing {path} gave id {max_id} >= {tokenizer.get_vocab_size()}: this is a bug")
        stem, made_from = path.name.removesuffix(".parquet"), {"shard": _shard_sha256(path), "tokenizer": tokenizer.id}
        _record_path(out / f"{stem}.index.npz").unlink(missing_ok=True)
        _write_cache_file(out / f"{stem}.tokens.npy", lambda tmp: _save_npy(tmp, tokens), made_from, tokens.nbytes,
                          max_id=max_id)
        _write_cache_file(out / f"{stem}.index.npz", lambda tmp: _save_npy(   # its record, last, marks completion
            tmp, offsets=offsets, batches=batches), made_from, offsets.nbytes + batches.nbytes)
        written += 1
    return written

# ---------------------------------------------------------------------------
# Attention kernels: the PyTorch fallback, and Flash Attention 3 fetched from the kernels hub at its pin and
# checked against plain masked attention (prepare.load_attention decides which one a run uses)
# ---------------------------------------------------------------------------


def _masked_attention(q, k, v, window):
    """Plain causal attention with an explicit (T, T) mask, on (B, H, T, D): the CPU path and the reference."""
    import torch
    import torch.nn.functional as F
    i = torch.arange(q.size(2), device=q.device)
    keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= window)   # (T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


_block_masks = {}   # (window, T) -> flex_attention BlockMask, built once per run outside the compiled graph


def sliding_window_mask(window, T, device):
    """flex_attention block mask: query i sees keys i - window ... i. Block-sparse, no T x T tensor."""
    if (window, T) not in _block_masks:
        from torch.nn.attention.flex_attention import create_block_mask

        def keep(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
        _block_masks[window, T] = create_block_mask(keep, None, None, T, T, device=device)
    return _block_masks[window, T]


def fallback_attention(q, k, v, window):
    """Causal sliding-window attention in PyTorch on (B, T, H, D): SDPA, flex_attention on a GPU, a mask on the CPU."""
    import torch.nn.functional as F
    T = q.size(1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))   # (B, H, T, D)
    if window < 0 or window >= T - 1:   # the window covers the whole causal past
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif q.is_cuda:
        from torch.nn.attention.flex_attention import flex_attention
        y = flex_attention(q, k, v, block_mask=sliding_window_mask(window, T, q.device))
    else:   # the CPU has no flex_attention backward; an explicit mask is fine at toy sizes
        y = _masked_attention(q, k, v, window)
    return y.transpose(1, 2)


def _hub_unreachable(endpoint):
    """Why the hub cannot be reached, or None; through a proxy a direct connection says nothing, so None."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    error = _connect_error(endpoint, timeout=3.0)
    return error and f"cannot reach {endpoint} ({error})"


def _is_offline(e):
    """Whether an exception, or one it came from, means that the hub was not reached: no network, or offline mode."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    while e is not None:
        if isinstance(e, (ConnectionError, TimeoutError, LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        kinds = type(e).__mro__   # the hub client's transport errors (httpx2 in huggingface_hub 2.x) are no OSError
        if type(e).__module__.startswith("httpx") and any(k.__name__ == "TransportError" for k in kinds):
            return True
        e = e.__cause__ or e.__context__
    return False


def fetch_flash_attention_3(repo):
    """FA3's interface module from the kernels hub at its pinned commit, tried once: (module, commit) or (None, why)."""
    from huggingface_hub import constants
    if not constants.HF_HUB_OFFLINE:
        unreachable = _hub_unreachable(constants.ENDPOINT)
        if unreachable:
            return None, f"offline: {unreachable}; HF_HUB_OFFLINE=1 uses a cached kernel without trying the network"
    commit = prepare.FA3_REVISIONS.get(repo, "")
    try:
        from kernels import get_kernel
        if not commit:
            from kernels._rust import KernelDependency, KernelVersion
            from kernels._versions import resolve_kernel_version
            version = KernelVersion.Version(prepare.FA3_VERSION)
            commit = resolve_kernel_version(KernelDependency(repo_id=repo, version=version),
                                            local_files_only=constants.HF_HUB_OFFLINE)
        return get_kernel(repo, revision=commit, trust_remote_code=[repo]).flash_attn_interface, commit
    except Exception as e:
        where = f"{repo}@{commit or f'v{prepare.FA3_VERSION}'}"
        if constants.HF_HUB_OFFLINE or _is_offline(e):
            why = "HF_HUB_OFFLINE is set and it is not in the local cache" if constants.HF_HUB_OFFLINE else \
                f"cannot reach {constants.ENDPOINT}"
            return None, f"offline: {where}: {why} ({first_line(e)[:160]})"
        return None, f"{where}: {first_line(e)[:200]}"


def check_flash_attention_3(kernel, head_dim, windows, seq_len, device="cuda"):
    """FA3's forward and backward at the model's head dim, windows and length, against the plain masked reference."""
    import torch
    gen = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(1, seq_len, 2, head_dim, generator=gen).to(device, torch.bfloat16) for _ in range(4))
    for window in sorted(set(windows)):
        results = []
        ours = prepare.Attention(kernel, "", "").flash_attn_func
        for attend in (lambda *t: ours(*t, causal=True, window_size=(window, 0)),
                       lambda *t: _masked_attention(*(x.float().transpose(1, 2) for x in t), window).transpose(1, 2)):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            y = attend(*leaves)
            y.backward(dy)
            results.append([y.float(), *(torch.zeros_like(t) if t.grad is None else t.grad.float() for t in leaves)])
        for name, ours, ref in zip(("output", "dq", "dk", "dv"), *results):
            error, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
            if not error <= 0.03 * max(scale, 1.0):   # bf16 rounding, with room; a wrong mask is off by O(1)
                raise RuntimeError(f"{name} at window {window} differs from masked attention by {error:.3g}")

def choose_attention(device, head_dim, windows, seq_len):
    """prepare.load_attention's choice, as Attention's (kernel, path, description); kernel None: the fallback."""
    import torch
    if torch.device(device).type != "cuda":
        return None, "sdpa-cpu", ("PyTorch SDPA with an explicit sliding-window mask (CPU; FA3 and flex_attention "
                                  "need a GPU)")
    repo = prepare.FA3_REPO_HOPPER if torch.cuda.get_device_capability() == (9, 0) else prepare.FA3_REPO_OTHER
    kernel, commit = fetch_flash_attention_3(repo)
    why = commit
    if kernel is not None:
        try:
            check_flash_attention_3(kernel, head_dim, windows, seq_len)
            pinned = "pinned" if prepare.FA3_REVISIONS.get(repo) else \
                f"NOT pinned: v{prepare.FA3_VERSION} resolved now, see docs/gpu.md"
            return kernel, f"fa3:{repo}@{commit[:12]}", f"Flash Attention 3, {repo}@{commit} ({pinned})"
        except Exception as e:
            why = f"{repo}@{commit} fails its check at head_dim {head_dim}: {first_line(e)[:200]}"
    for window in set(windows):   # built here, once, not inside the compiled graph
        if 0 <= window < seq_len - 1:
            sliding_window_mask(window, seq_len, torch.device(device))
    return None, "flex+sdpa", (f"PyTorch fallback, flex_attention (sliding windows) + causal SDPA, slower than FA3; "
                               f"Flash Attention 3 unavailable: {why}")


# Out-of-memory failures that are not torch.OutOfMemoryError: cuBLAS and cuDNN report theirs as RuntimeError
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS")


def is_out_of_memory(e):
    import torch
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM_MESSAGES))

# ---------------------------------------------------------------------------
# Smoke run: the current train.py at toy size through this harness, on the GPU if there is one, else the CPU
# ---------------------------------------------------------------------------

SMOKE_SEQ_LEN = 128                      # MAX_SEQ_LEN of a smoke run
SMOKE_EVAL_TOKENS = 16 * SMOKE_SEQ_LEN   # EVAL_TOKENS of a smoke run: 16 validation rows
SMOKE_STEPS = 3                          # timed steps (AUTORESEARCH_STEP_BUDGET), after SMOKE_UNTIMED_STEPS
SMOKE_UNTIMED_STEPS = 1                  # UNTIMED_STEPS of a smoke run: its timing is not comparable anyway
SMOKE_SIZE = dict(DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=64, DEVICE_BATCH_SIZE=4,   # train.py's lines replaced
                  TOTAL_BATCH_SIZE=2 * 4 * SMOKE_SEQ_LEN)                       # 2 micro-steps per step


def smoke_script(src, seq_len=SMOKE_SEQ_LEN, eval_tokens=SMOKE_EVAL_TOKENS, **edits):
    """
    train.py's source at toy size: each line `NAME = ...` of SMOKE_SIZE (and of `edits`, which must exist)
    replaced, and the harness's sequence length, evaluation size and warm-up steps shrunk in that process only.
    """
    for name, value in {**SMOKE_SIZE, **edits}.items():
        src, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", src, flags=re.M)
        if n != 1 and name in edits:
            raise HarnessError(f"train.py has no single line `{name} = ...` to set")
    shrink = (f"import prepare  # smoke run: the harness's constants shrunk in this process only\n"
              f"prepare.MAX_SEQ_LEN = MAX_SEQ_LEN = {seq_len}\nprepare.EVAL_TOKENS = {eval_tokens}\n"
              f"prepare.UNTIMED_STEPS = UNTIMED_STEPS = {SMOKE_UNTIMED_STEPS}\n")
    src, n = re.subn(r"^from prepare import (\([^)]*\)|.*)$", lambda m: m.group(0) + "\n" + shrink, src,
                     count=1, flags=re.M)
    if n != 1:
        raise HarnessError("train.py has no line `from prepare import ...`: it must take the harness from prepare.py")
    return src


def run_smoke(train_path=None, steps=SMOKE_STEPS):
    """Run a toy-size copy of train.py (the current one, with the agent's edits) to its summary block; its exit code."""
    train_path = Path(train_path or Path(__file__).with_name("train.py"))
    try:
        Tokenizer.from_directory()
        list_shards("val"), list_shards("train")
    except HarnessError:
        raise HarnessError(f"--smoke needs a prepared cache and {prepare.DATA_DIR.parent} has none: run "
                           f"`uv run prepare.py` first (or with --source DIR)") from None
    size = ", ".join(f"{k}={v}" for k, v in SMOKE_SIZE.items())
    print(f"smoke: {train_path} at toy size ({size}, MAX_SEQ_LEN={SMOKE_SEQ_LEN}), {steps} timed steps, "
          f"on the GPU if there is one; data: {prepare.DATASET}", flush=True)
    pythonpath = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "AUTORESEARCH_STEP_BUDGET": str(steps), "PYTHONPATH": pythonpath}   # imports this prepare.py
    with tempfile.TemporaryDirectory(prefix="autoresearch-smoke-") as tmp:
        script = Path(tmp) / "train.py"
        script.write_text(smoke_script(train_path.read_text()))
        code = subprocess.run([sys.executable, str(script)], cwd=train_path.parent, env=env).returncode
    if code != 0:
        raise HarnessError(f"the smoke run of {train_path} failed (exit code {code}): the lines above say why")
    return 0

# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download the data and train the tokenizer (run once).")
    parser.add_argument("--num-shards", type=int, default=10, help="training shards to download, -1 = all (default 10)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--source", metavar="DIR",
                        help="use local parquet files with a `text` column instead of downloading")
    source.add_argument("--dataset", metavar="NAME", help="convert a Hugging Face dataset (or a local directory "
                        "that datasets.load_dataset reads) into a cache of its own, and make it the active one")
    parser.add_argument("--text-column", metavar="COL", help="the text column of --dataset (default: text)")
    parser.add_argument("--smoke", action="store_true", help="instead: run the current train.py at toy size through "
                        "the harness (GPU if any, else CPU; needs a prepared cache) and print its summary block")
    args = parser.parse_args(argv)
    if args.smoke:
        return run_smoke()
    if args.text_column and not args.dataset:
        parser.error("--text-column goes with --dataset")
    name = dataset_name(args.dataset) if args.dataset else None
    if name == DATASET_REPO:
        raise HarnessError(f"{name} is the default dataset: run `uv run prepare.py` to download it")
    if args.source:
        name = f"local:{check_source(args.source)}"
    root = dataset_root(name or DATASET_REPO)   # this command fills this directory, whatever is active now
    prepare.DATA_DIR, prepare.TOKENIZER_DIR = root / "data", root / "tokenizer"
    t0 = time.time()
    print(f"cache: {prepare.CACHE_DIR}")
    lock_cache(exclusive=True)
    for orphan in prepare.CACHE_DIR.rglob(".*.tmp"):   # left by a run that was killed mid-write
        orphan.unlink(missing_ok=True)
    if args.dataset:
        done, converted = convert_dataset(name, args.text_column or "text")
        print(f"data: {done['train_shards']} training shards ({done['train_docs']:,} documents) + validation "
              f"({done['validation']}), {'converted' if converted else 'already'} in {prepare.DATA_DIR}")
    elif args.source:
        n_train, val_name, copied = copy_source(args.source)
        print(f"data: {n_train} training shards + validation ({val_name}) from {args.source}, "
              f"{copied} copied into {prepare.DATA_DIR}")
    else:
        fetched, present = download_data(args.num_shards, args.download_workers)
        print(f"data: {fetched} shards downloaded, {present} already present, in {prepare.DATA_DIR}")
    seconds = train_tokenizer()
    if seconds is None:
        print(f"tokenizer: up to date in {prepare.TOKENIZER_DIR}")
    else:
        print(f"tokenizer: trained {prepare.VOCAB_SIZE} tokens in {seconds:.1f}s, saved to {prepare.TOKENIZER_DIR}")
    t1 = time.time()
    tokenizer = Tokenizer.from_directory(check_metric_files=False)
    written = cache_tokens(tokenizer)
    prepare.validation_rows(tokenizer, prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN)
    print(f"tokens: {written} shards tokenized into {tokens_dir(tokenizer)} in {time.time() - t1:.1f}s, "
          f"validation rows packed")
    if name:   # the pointer that makes this dataset the active one for train.py
        _atomic_write(prepare.CACHE_DIR / "dataset.txt", lambda tmp: tmp.write_text(name + "\n"))
    else:
        (prepare.CACHE_DIR / "dataset.txt").unlink(missing_ok=True)
    prepare.DATASET = read_source(prepare.DATA_DIR)["dataset"]
    print(f"done in {time.time() - t0:.1f}s: dataset {prepare.DATASET} is active, now run `uv run train.py`")
    if dataset_root(prepare.configured_dataset()) != root:
        print(f"note: AUTORESEARCH_DATASET={os.environ['AUTORESEARCH_DATASET']} is set and overrides this for train.py")
