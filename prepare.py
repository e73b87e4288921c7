"""
One-time data preparation, and the runtime utilities that train.py imports.

    uv run prepare.py                      # default dataset: 10 training shards + validation
    uv run prepare.py --num-shards 50      # more training data (-1 = all 6,542 shards)
    uv run prepare.py --source DIR         # local parquet files with a `text` column, no download
    uv run prepare.py --dataset NAME       # any Hugging Face text dataset (or a local directory of files)

It downloads the data, trains the BPE tokenizer, and provides the tokenizer
wrapper, the BOS-aligned dataloader and the fixed metric `val_bpb`.
This file is the frozen harness: the agent never edits it.
"""

import argparse
import base64
import bisect
import collections
import errno
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken

# torch is imported inside the functions that train.py calls: preparing data does not need it,
# and importing it takes seconds

# ---------------------------------------------------------------------------
# Constants (fixed, do not modify: the agent never does; a user may, once, before a night, see README)
# ---------------------------------------------------------------------------

MAX_SEQ_LEN = 2048              # context length, also the fixed eval sequence length
TIME_BUDGET = 300               # seconds of training (excluding startup and compile warm-up)
EVAL_TOKENS = 40 * 524288       # tokens scored by the validation metric
VOCAB_SIZE = 8192               # tokenizer size, special tokens included

# GPT-4's pre-tokenizer with \p{N}{1,2} instead of \p{N}{1,3}
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]

TOKENIZER_MAX_DOC_CHARS = 10_000         # each document is capped at this many characters
TOKENIZER_MAX_CHARS = 1_000_000_000      # characters of training text in all
TOKENIZER_BATCH = 128                    # documents tokenized together by the dataloader
LOADER_BUFFER = 1000                     # tokenized documents kept for best-fit packing
TOKEN_CACHE_SHARDS = 64                  # training shards tokenized at prepare time; later ones on the fly
SHARD_DOCS = 100_000                     # --dataset: documents per shard written, at most
SHARD_CHARS = 250_000_000                # --dataset: characters per shard, at most (long documents)
ROW_GROUP_DOCS = 1024                    # --dataset: documents per parquet row group
HOLDOUT_DOCS = 50_000                    # --dataset validation: its validation split, or else 1% of train held out,
HOLDOUT_CHARS = 100_000_000              #   at most this many documents and characters

DATASET_REPO = "karpathy/climbmix-400b-shuffle"
MAX_SHARD = 6542                                  # shards are shard_00000 ... shard_06542
VAL_FILENAME = f"shard_{MAX_SHARD:05d}.parquet"   # the last shard is pinned for validation

# Smoke and test runs: stop after this many timed steps instead of TIME_BUDGET seconds, and drive the schedules
# by steps too, so that their outcome never depends on the machine's speed or load. 0 (unset) in a real run.
STEP_BUDGET = int(os.environ.get("AUTORESEARCH_STEP_BUDGET") or 0)

CACHE_DIR = Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")
# DATA_DIR, TOKENIZER_DIR and DATASET follow the active dataset: see "The active dataset" below


class HarnessError(SystemExit):
    """A failure the user can fix: exits with code 1 and one line saying what to do."""

    def __init__(self, message):
        super().__init__(f"prepare.py: {message}")


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


# ---------------------------------------------------------------------------
# Records: every cache file has one beside it (NAME.sha256.json), written right after the file: its sha256, its
# size and what it was made from (source shard, tokenizer, settings, by content). A file whose record is missing
# or does not match is never used: prepare.py rebuilds it, train.py refuses or falls back to the source.
# ---------------------------------------------------------------------------


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_path(path):
    return Path(path).with_name(Path(path).name + ".sha256.json")


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
    path = CACHE_DIR / ".lock"
    if path in _held_locks:
        return
    if exclusive:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
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
            raise HarnessError(f"a prepare.py is writing the cache {CACHE_DIR}: run again once it has finished")
        print(f"waiting for the cache {CACHE_DIR}: a train.py run or another prepare.py is using it", flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    _held_locks[path] = fd


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


def list_shards(split, data_dir=None):
    """Parquet shards of a split: 'train' is every shard but the pinned validation one."""
    data_dir = Path(data_dir or DATA_DIR)
    names = sorted(p.name for p in data_dir.glob("shard_*.parquet")) if data_dir.is_dir() else []
    if split == "val":
        names = [n for n in names if n == VAL_FILENAME]
    elif split == "train":
        names = [n for n in names if n != VAL_FILENAME]
    else:
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if not names:
        what = "validation shard" if split == "val" else "training shards"
        raise HarnessError(f"no {what} in {data_dir}: run `uv run prepare.py` (or with --source DIR or --dataset NAME)")
    return [data_dir / n for n in names]

# ---------------------------------------------------------------------------
# The active dataset: the default one in CACHE_DIR, or a --dataset in CACHE_DIR/datasets/<slug>
# ---------------------------------------------------------------------------


def dataset_name(name):
    """A local directory is named by its absolute path, as load_dataset would read it; anything else is a hub name."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def dataset_root(name):
    """
    Where a dataset's data/, tokenizer/ and tokens/ live, apart from every other's: CACHE_DIR for the default one,
    CACHE_DIR/sources/<slug> for a --source directory (named 'local:<its path>'), else CACHE_DIR/datasets/<slug>:
    'owner/name' -> 'owner--name', a directory -> 'local--<its name>-<hash of its path>'.
    """
    if name == DATASET_REPO:
        return CACHE_DIR
    parent = "datasets"
    if name.startswith("local:"):
        parent, name = "sources", name.removeprefix("local:")
    slug = f"local--{Path(name).name}-{hashlib.sha256(name.encode()).hexdigest()[:8]}" if os.path.isabs(name) else name
    slug = re.sub(r"[^A-Za-z0-9._-]", "", slug.replace("/", "--"))
    if not slug.strip(".") or parent == "sources" and not os.path.isabs(name):
        raise HarnessError(f"{name!r} is not a dataset name")
    return CACHE_DIR / parent / slug


def read_source(data_dir):
    """Where a data directory's shards come from, in source.json beside it: {"dataset": name, ...}, or {}."""
    try:
        return json.loads(Path(data_dir).with_name("source.json").read_text())
    except (OSError, ValueError):
        return {}


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


def configured_dataset():
    """AUTORESEARCH_DATASET if set, else the pointer CACHE_DIR/dataset.txt from `prepare.py --dataset`, else the default."""
    name = os.environ.get("AUTORESEARCH_DATASET", "").strip()
    if not name:
        try:
            name = (CACHE_DIR / "dataset.txt").read_text().strip()
        except OSError:
            pass
    return dataset_name(name) if name else DATASET_REPO


DATA_DIR = dataset_root(configured_dataset()) / "data"
TOKENIZER_DIR = DATA_DIR.parent / "tokenizer"
DATASET = read_source(DATA_DIR).get("dataset") or configured_dataset()   # the active dataset's name, for train.py

# ---------------------------------------------------------------------------
# Data: download from the Hugging Face hub, or copy from a local directory
# ---------------------------------------------------------------------------


def _network_hint(repo=DATASET_REPO):
    from huggingface_hub import constants
    return (f"cannot download {repo} from {constants.ENDPOINT}: check the network, set HF_ENDPOINT to a "
            f"reachable mirror (and HF_TOKEN if it needs one), or use local parquet files with "
            f"`uv run prepare.py --source DIR`")


def _check_reachable(repo=DATASET_REPO, timeout=5.0):
    """Fail in seconds, not after the hub client's minute of retries, when the endpoint cannot be reached."""
    import socket
    from urllib.parse import urlsplit
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise HarnessError(f"{_network_hint(repo)} (HF_HUB_OFFLINE is set and shards are missing)")
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        raise HarnessError(f"{_network_hint(repo)} ({e})") from None


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
    data_dir = Path(data_dir or DATA_DIR)
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
    source, cache = source.resolve(), CACHE_DIR.resolve()
    if source == cache or cache in source.parents:
        raise HarnessError(f"--source {source} is inside the cache {cache}: give a directory of your own parquet files")
    return source


def copy_source(source, data_dir=None):
    """Mirror a directory of parquet files into the cache under canonical shard names, verified by content."""
    source, data_dir = check_source(source), Path(data_dir or DATA_DIR)
    files = sorted(source.glob("*.parquet"))
    if len(files) < 2:
        raise HarnessError(f"--source {source} needs at least 2 parquet files (training + validation), found {len(files)}")
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


def _one_line(e):
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


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
    data_dir = Path(data_dir or DATA_DIR)
    done = read_source(data_dir)
    if (done.get("dataset"), done.get("text_column")) == (name, column) and _converted(data_dir, done):
        return done, False
    if not Path(name).is_dir():
        _check_reachable(name)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)   # its errors reach the user in our one line
    try:
        splits = datasets.load_dataset(name, streaming=True)
    except Exception as e:
        raise HarnessError(f"cannot load dataset {name} ({_one_line(e)}): check the name; for the hub set HF_ENDPOINT "
                           f"(and HF_TOKEN if it needs one), or use local parquet files with --source DIR") from None
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
        raise HarnessError(f"reading {name} failed ({_one_line(e)}); nothing was kept: fix the cause and "
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


def _shard_sha256(path, full=True):
    """A data shard's content hash, from its record once the file is checked against it."""
    record = read_record(path, full=full)
    if record is None:
        raise HarnessError(_mismatch(path))
    return record["sha256"]


def _data_fingerprint(paths):
    """What the tokenizer depends on: the settings, the source and its shards' content. Any change: train again."""
    settings = [VOCAB_SIZE, SPLIT_PATTERN, TOKENIZER_MAX_DOC_CHARS, TOKENIZER_MAX_CHARS]
    return settings + [read_source(paths[0].parent).get("dataset")] + [[p.name, _shard_sha256(p, False)] for p in paths]


def train_tokenizer(data_dir=None, tokenizer_dir=None):
    """Train the BPE on the training shards; save the merges and token byte lengths. Returns seconds taken, or None if up to date."""
    import rustbpe
    data_dir, tokenizer_dir = Path(data_dir or DATA_DIR), Path(tokenizer_dir or TOKENIZER_DIR)
    paths = list_shards("train", data_dir)
    fingerprint = _data_fingerprint(paths)
    meta_path = tokenizer_dir / "tokenizer.json"
    record = read_record(meta_path, fingerprint)
    if record and read_record(tokenizer_dir / "token_bytes.npy", {"tokenizer": record["sha256"]}):
        return None
    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(_tokenizer_training_text(paths), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = sorted(bpe.get_mergeable_ranks(), key=lambda kv: kv[1])
    n_ranks = len(ranks)
    if n_ranks != VOCAB_SIZE - len(SPECIAL_TOKENS) or [r for _, r in ranks] != list(range(n_ranks)):
        raise HarnessError(f"the training text yields only {n_ranks} of {VOCAB_SIZE - len(SPECIAL_TOKENS)} "
                           f"BPE tokens: give prepare.py more training data")
    meta = {
        "pattern": bpe.get_pattern(),
        "special_tokens": {name: n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)},
        "mergeable_ranks": [base64.b64encode(bytes(b)).decode("ascii") for b, _ in ranks],   # index = rank
        "data": fingerprint,
    }
    tokenizer = Tokenizer(_encoding_from_meta(meta))
    text = "Hello world! Numbers 0, 12, 345 and 6789; punctuation?! (yes) -- tabs\tand\nnewlines. 你好，世界。 Ünïcödé ✓"
    if tokenizer.decode(tokenizer.encode(text)) != text:
        raise HarnessError("the trained tokenizer does not round-trip text: this is a bug, please report it")
    token_bytes = np.zeros(VOCAB_SIZE, dtype=np.int32)   # special tokens stay 0: they carry no bytes
    token_bytes[:n_ranks] = [len(bytes(b)) for b, _ in ranks]
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    _record_path(tokenizer_dir / "token_bytes.npy").unlink(missing_ok=True)
    record = _write_cache_file(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)), fingerprint)
    _write_cache_file(tokenizer_dir / "token_bytes.npy", lambda tmp: _save_npy(tmp, token_bytes),
                      {"tokenizer": record["sha256"]})   # its record, written last, marks completion
    return time.time() - t0


def _encoding_from_meta(meta):
    ranks = {base64.b64decode(s): rank for rank, s in enumerate(meta["mergeable_ranks"])}
    return tiktoken.Encoding("rustbpe", pat_str=meta["pattern"], mergeable_ranks=ranks,
                             special_tokens=meta["special_tokens"])


class Tokenizer:
    """The tiktoken encoding with the BOS convention the dataloader and train.py use."""

    def __init__(self, enc, id=None):
        self.enc = enc
        self.id = id   # a hash of the saved tokenizer: names its token cache
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir=None, check_metric_files=True):
        """
        The saved tokenizer, once the files the metric depends on match their records (tokenizer, token byte
        lengths, validation shard and rows; prepare.py, which repairs them, skips the last three). Holds a shared
        lock on the cache until the process exits, so that no prepare.py rewrites them under a run.
        """
        tokenizer_dir = Path(tokenizer_dir or TOKENIZER_DIR)
        lock_cache(exclusive=False)
        try:
            raw = (tokenizer_dir / "tokenizer.json").read_bytes()
            meta = json.loads(raw)
        except (OSError, ValueError):
            raise HarnessError(f"no tokenizer in {tokenizer_dir}: run `uv run prepare.py`") from None
        sha = hashlib.sha256(raw).hexdigest()
        record = read_record(tokenizer_dir / "tokenizer.json", full=False)
        if record is None or record["sha256"] != sha:
            raise HarnessError(_mismatch(tokenizer_dir / "tokenizer.json"))
        tokenizer = cls(_encoding_from_meta(meta), id=sha[:16])
        if check_metric_files:
            _check_metric_files(tokenizer, tokenizer_dir, sha)
        return tokenizer

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """Encode a string, or a list of strings in parallel; `prepend` is a token id or special token."""
        if isinstance(prepend, str):
            prepend = self.enc.encode_single_token(prepend)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ids if prepend is None else [prepend] + ids
        batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        return batch if prepend is None else [[prepend] + ids for ids in batch]

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(device="cpu", tokenizer_dir=None):
    """UTF-8 byte length of every token id (0 for special tokens), as an int32 tensor, checked against its record."""
    import torch
    path = Path(tokenizer_dir or TOKENIZER_DIR) / "token_bytes.npy"
    if not path.exists():
        raise HarnessError(f"no token byte lengths at {path}: run `uv run prepare.py`")
    tokenizer = read_record(path.with_name("tokenizer.json"))
    if tokenizer is None or read_record(path, {"tokenizer": tokenizer["sha256"]}) is None:
        raise HarnessError(_mismatch(path))
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False)).to(device)
    except (OSError, ValueError):
        raise HarnessError(_mismatch(path)) from None


def _check_metric_files(tokenizer, tokenizer_dir, sha):
    """Refuse, in one line, a run whose metric would come from files that do not match their records."""
    token_bytes = tokenizer_dir / "token_bytes.npy"
    if token_bytes.exists() and read_record(token_bytes, {"tokenizer": sha}) is None:
        raise HarnessError(_mismatch(token_bytes))
    if (tokenizer_dir.parent / "data" / VAL_FILENAME).exists():
        n_rows = EVAL_TOKENS // MAX_SEQ_LEN
        rows, made_from = _validation_rows_file(tokenizer_dir.parent, tokenizer, MAX_SEQ_LEN, n_rows)
        if rows.exists() and read_record(rows, made_from) is None:
            raise HarnessError(_mismatch(rows))


def _validation_rows_file(root, tokenizer, T, n_rows):
    """Where a dataset root caches its packed validation rows, and what they are made from (by content)."""
    shard = _shard_sha256(root / "data" / VAL_FILENAME)
    made_from = {"shard": shard, "tokenizer": tokenizer.id, "T": T, "rows": n_rows}
    return root / "tokens" / tokenizer.id / f"val_rows_T{T}_N{n_rows}.npy", made_from

# ---------------------------------------------------------------------------
# Token cache: every shard tokenized once, at prepare time
# ---------------------------------------------------------------------------


def _token_dtype():
    return np.uint16 if VOCAB_SIZE <= 1 << 16 else np.uint32


def _tokens_dir(tokenizer):
    """Token files sit next to the data they come from, and depend on the tokenizer: one directory per tokenizer."""
    return Path(DATA_DIR).parent / "tokens" / tokenizer.id if tokenizer.id else None


def tokenize_shard(path, tokenizer):
    """
    All documents of a shard in reading order, BOS first in each: (tokens, offsets, batches).
    Document i is tokens[offsets[i]:offsets[i + 1]]; the loader takes documents in the
    tokenizer batches of the reference (row group by row group, 128 at a time), whose
    bounds are `batches`.
    """
    pf = pq.ParquetFile(path)
    bos = tokenizer.get_bos_token_id()
    docs, batches = [], [0]
    for rg in range(pf.num_row_groups):
        texts = [t or "" for t in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()]
        docs += tokenizer.encode(texts, prepend=bos, num_threads=os.cpu_count() or 8)
        start = batches[-1]
        batches += [start + min(i + TOKENIZER_BATCH, len(texts)) for i in range(0, len(texts), TOKENIZER_BATCH)]
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=_token_dtype(), count=offsets[-1])
    return tokens, offsets, np.array(batches, dtype=np.int64)


def cache_tokens(tokenizer, max_train_shards=TOKEN_CACHE_SHARDS):
    """
    Tokenize the validation shard and the first training shards into the cache, each checked by content against
    its record first. Returns how many were written.
    """
    out = _tokens_dir(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.iterdir():   # token files of an older tokenizer
        if stale != out:
            shutil.rmtree(stale, ignore_errors=True)
    written = 0
    for path in list_shards("val") + list_shards("train")[:max_train_shards]:
        if _load_shard_tokens(path, tokenizer, full=True) is not None:
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


def _load_shard_tokens(path, tokenizer, full=False):
    """
    A shard's cached (tokens, offsets, batches), or None if it is not cached for this exact file and tokenizer.
    Checked against the records by content when `full` (prepare time, the validation shard), else by size; and
    never an id beyond the vocabulary.
    """
    out = _tokens_dir(tokenizer)
    if out is None:
        return None
    stem = path.name.removesuffix(".parquet")
    shard = read_record(path, full=full)
    made_from = shard and {"shard": shard["sha256"], "tokenizer": tokenizer.id}
    record = made_from and read_record(out / f"{stem}.tokens.npy", made_from, full)
    if not (record and read_record(out / f"{stem}.index.npz", made_from, full)):
        return None
    try:
        with np.load(out / f"{stem}.index.npz", allow_pickle=False) as index:
            offsets, batches = index["offsets"], index["batches"]
        tokens = np.load(out / f"{stem}.tokens.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError):
        return None
    if len(tokens) != offsets[-1]:
        return None
    if len(tokens) and max(record["max_id"], int(tokens.max())) >= tokenizer.get_vocab_size():
        print(f"prepare.py: {out / stem}.tokens.npy holds ids beyond the vocabulary (overwritten or damaged): "
              f"tokenizing {path.name} instead; run `uv run prepare.py` to repair the cache", file=sys.stderr)
        return None
    return tokens, offsets, batches

# ---------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing
# ---------------------------------------------------------------------------


def _document_batches(tokenizer, split):
    """Tokenized documents of a split in a fixed order, one tokenizer batch at a time, forever: (docs, epoch)."""
    paths = list_shards(split)
    epoch = 1
    while True:
        for path in paths:
            try:
                cached = _load_shard_tokens(path, tokenizer, full=split == "val")
                tokens, offsets, batches = cached if cached is not None else tokenize_shard(path, tokenizer)
            except (OSError, ValueError) as e:   # pyarrow raises ArrowInvalid (a ValueError) on corrupt data
                raise HarnessError(f"cannot read {path} ({e}): delete it and run `uv run prepare.py` again") from None
            for b0, b1 in zip(batches[:-1].tolist(), batches[1:].tolist()):
                yield [tokens[offsets[i]:offsets[i + 1]] for i in range(b0, b1)], epoch
        epoch += 1


class _BestFitPacker:
    """
    Fills rows left to right from a buffer of LOADER_BUFFER documents: the largest document
    that fits, else the shortest one cropped to fill the row. Among equal lengths the
    oldest goes first. Documents are kept in per-length queues, so a choice is a bisection
    over the distinct lengths rather than a scan of the buffer.
    """

    def __init__(self, tokenizer, split):
        self.batches = _document_batches(tokenizer, split)
        self.lengths = []       # distinct document lengths in the buffer, sorted
        self.by_length = {}     # length -> documents of that length, oldest first
        self.size = 0
        self.epoch = 1

    def _take(self, space):
        i = max(bisect.bisect_right(self.lengths, space) - 1, 0)   # nothing fits: i = 0, the shortest
        length = self.lengths[i]
        queue = self.by_length[length]
        doc = queue.popleft()
        if not queue:
            del self.by_length[length]
            self.lengths.pop(i)
        self.size -= 1
        return doc

    def fill(self, row):
        """Fill a 1-D array of T + 1 tokens; returns the epoch of the stream."""
        pos, n = 0, len(row)
        while pos < n:
            while self.size < LOADER_BUFFER:
                docs, self.epoch = next(self.batches)
                for doc in docs:
                    queue = self.by_length.get(len(doc))
                    if queue is None:
                        queue = self.by_length[len(doc)] = collections.deque()
                        bisect.insort(self.lengths, len(doc))
                    queue.append(doc)
                self.size += len(docs)
            doc = self._take(n - pos)[:n - pos]
            row[pos:pos + len(doc)] = doc
            pos += len(doc)
        return self.epoch


def make_dataloader(tokenizer, B, T, split, device=None):
    """Yield (inputs, targets, epoch) forever: B packed rows, int64 on `device` (CUDA when available by default)."""
    import torch
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_cuda = device.type == "cuda"
    packer = _BestFitPacker(tokenizer, split)
    rows = np.empty((B, T + 1), dtype=np.int64)
    host = torch.empty(B, T + 1, dtype=torch.long, pin_memory=use_cuda)
    copied = torch.cuda.Event() if use_cuda else None
    while True:
        for row in rows:
            epoch = packer.fill(row)
        if use_cuda:
            copied.synchronize()   # the previous asynchronous copy has finished reading `host`
        host.copy_(torch.from_numpy(rows))
        if use_cuda:
            batch = host.to(device, non_blocking=True)
            copied.record()
        else:
            batch = host.clone()
        yield batch[:, :-1], batch[:, 1:], epoch


def validation_rows(tokenizer, T, n_rows):
    """
    The first n_rows packed validation rows, (n_rows, T + 1): packed once, then read from the cache when the file
    matches its record. Caching them is only an optimisation: a failure to write is a note, never an error.
    """
    path = None
    if tokenizer.id:
        list_shards("val")   # no validation shard: one line saying what to run
        path, made_from = _validation_rows_file(Path(DATA_DIR).parent, tokenizer, T, n_rows)
        if read_record(path, made_from):
            return np.load(path, allow_pickle=False)
    packer = _BestFitPacker(tokenizer, "val")
    rows = np.empty((n_rows, T + 1), dtype=_token_dtype())
    for row in rows:
        packer.fill(row)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_cache_file(path, lambda tmp: _save_npy(tmp, rows), made_from, rows.nbytes)
        except (OSError, DiskFull) as e:
            why = e.code if isinstance(e, DiskFull) else f"{type(e).__name__}: {e}"
            print(f"note: the validation rows are not cached ({why}); they are packed again next time")
    return rows

# ---------------------------------------------------------------------------
# The training budget: TIME_BUDGET seconds of timed steps, or STEP_BUDGET timed steps in a smoke or test run
# ---------------------------------------------------------------------------

UNTIMED_STEPS = 11   # the first steps compile and warm up: not counted in the budget (as in the reference)


def training_progress(training_seconds, timed_steps):
    """The fraction of the budget used after `timed_steps` steps that took `training_seconds`, at most 1."""
    if STEP_BUDGET > 0:
        return min(timed_steps / STEP_BUDGET, 1.0)
    return min(training_seconds / TIME_BUDGET, 1.0)


def budget_description():
    if STEP_BUDGET > 0:
        return f"{STEP_BUDGET} timed steps (AUTORESEARCH_STEP_BUDGET: a smoke or test run, not comparable)"
    return f"{TIME_BUDGET}s of training"

# ---------------------------------------------------------------------------
# The GPU: found or refused, its peak FLOP/s for MFU, and the allocator setting
# ---------------------------------------------------------------------------

# Fewer out-of-memory failures from fragmentation when the device batch or the model changes between runs.
# torch 2.9.1's CUDA caching allocator reads PYTORCH_CUDA_ALLOC_CONF; its generic allocator config reads
# PYTORCH_ALLOC_CONF and warns in every log when only the older name is set, so both get the same value.
# Read when CUDA first allocates, so setting them when train.py imports this file is early enough.
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"

# Peak dense bf16 tensor-core FLOP/s from NVIDIA's datasheets, for MFU. Regex on the device name, first match
# wins; a GPU not listed gets MFU "unknown" rather than a number against the wrong peak.
GPU_PEAK_FLOPS = {
    r"H100 NVL|H200 NVL": 835.5e12,
    r"H100 PCIe": 756e12,
    r"H100 (80GB HBM3|SXM)|GH200": 989.5e12,
    r"H200": 989.5e12,
    r"A100": 312e12,
    r"L40S$": 362.05e12,
    r"L40$": 181.05e12,
    r"\bL4$": 121e12,
    r"\bA10$": 125e12,
    r"RTX 4090$": 165.2e12,
    r"RTX 3090$": 71e12,
}


def gpu_peak_flops(gpu_name):
    """The bf16 peak of a GPU from its device name, or None if it is not in GPU_PEAK_FLOPS."""
    return next((flops for pattern, flops in GPU_PEAK_FLOPS.items() if re.search(pattern, gpu_name)), None)


def steady_state_mfu(flops_per_step, step, training_seconds, peak_flops):
    """MFU in percent after `step` steps, counting step - 10 of them as the reference does; None if unknown."""
    if not peak_flops or training_seconds <= 0:
        return None
    return 100 * flops_per_step * (step - (UNTIMED_STEPS - 1)) / training_seconds / peak_flops


def require_gpu():
    """Stop at once, in one line, on a machine with no CUDA GPU, unless this is a step-budgeted smoke or test run."""
    import torch
    if STEP_BUDGET <= 0 and not torch.cuda.is_available():
        raise SystemExit("train.py: no CUDA GPU found: a real run needs one (at the default size it would take hours "
                         "on the CPU); `uv run prepare.py --smoke` runs this train.py at toy size on the CPU")

# ---------------------------------------------------------------------------
# Attention: one kernel for every experiment of a night, Flash Attention 3 or the PyTorch fallback
# ---------------------------------------------------------------------------

FA3_REPO_HOPPER = "varunneal/flash-attention-3"   # compute capability 9.0: H100, H200, GH200
FA3_REPO_OTHER = "kernels-community/flash-attn3"
# The commit of each repository that runs (a full 40-character sha, never a branch), so that a push there
# never changes a night's kernel. "" means not pinned yet: the run then loads the commit that the
# repository's version-1 branch points to at start-up, and names that commit in its `attention:` line.
# README.md ("Flash Attention 3") says how to find a commit and move the pin.
FA3_REVISIONS = {
    FA3_REPO_HOPPER: "",
    FA3_REPO_OTHER: "",
}
FA3_VERSION = 1   # the kernels-hub version branch (v1) an unpinned repository resolves to


def _masked_attention(q, k, v, window):
    """Plain causal attention with an explicit (T, T) mask, on (B, H, T, D): the CPU path and the reference."""
    import torch
    import torch.nn.functional as F
    i = torch.arange(q.size(2), device=q.device)
    keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= window)   # (T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


_block_masks = {}   # (window, T) -> flex_attention BlockMask, built once per run outside the compiled graph


def _sliding_window_mask(window, T, device):
    """flex_attention block mask: query i sees keys i - window ... i. Block-sparse, no T x T tensor."""
    if (window, T) not in _block_masks:
        from torch.nn.attention.flex_attention import create_block_mask

        def keep(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
        _block_masks[window, T] = create_block_mask(keep, None, None, T, T, device=device)
    return _block_masks[window, T]


def _fallback_attention(q, k, v, window):
    """Causal sliding-window attention in PyTorch on (B, T, H, D): SDPA, flex_attention on a GPU, a mask on the CPU."""
    import torch.nn.functional as F
    T = q.size(1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))   # (B, H, T, D)
    if window < 0 or window >= T - 1:   # the window covers the whole causal past
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif q.is_cuda:
        from torch.nn.attention.flex_attention import flex_attention
        y = flex_attention(q, k, v, block_mask=_sliding_window_mask(window, T, q.device))
    else:   # the CPU has no flex_attention backward; an explicit mask is fine at toy sizes
        y = _masked_attention(q, k, v, window)
    return y.transpose(1, 2)


class Attention:
    """
    What train.py calls: flash_attn_func(q, k, v, causal=True, window_size=(window, 0)) on (B, T, H, D), FA3's
    signature, where query i attends to keys i - window ... i. `path` names the kernel for the summary block.
    """

    def __init__(self, kernel, path, description):
        self.kernel, self.path, self.description = kernel, path, description

    def flash_attn_func(self, q, k, v, causal=True, window_size=(-1, -1)):
        if not causal or window_size[1] != 0:
            raise ValueError("the harness's attention is causal only: call it with causal=True, window_size=(w, 0)")
        q, k = q.to(v.dtype), k.to(v.dtype)   # one dtype: under autocast the QK-norm may return float32
        if self.kernel is None:
            return _fallback_attention(q, k, v, window_size[0])
        y = self.kernel.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        return y[0] if isinstance(y, tuple) else y


def _first_line(e):
    return " ".join(f"{type(e).__name__}: {e}".split())


def _hub_unreachable(endpoint, timeout=3.0):
    """Why the hub cannot be reached (one TCP connection, seconds), or None; the hub client would retry for 30 s."""
    import socket
    from urllib.parse import urlsplit
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None   # through a proxy a direct connection says nothing
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"cannot reach {endpoint} ({e})"
    return None


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


def _fetch_flash_attention_3(repo):
    """FA3's interface module from the kernels hub at its pinned commit, tried once: (module, commit) or (None, why)."""
    from huggingface_hub import constants
    if not constants.HF_HUB_OFFLINE:
        unreachable = _hub_unreachable(constants.ENDPOINT)
        if unreachable:
            return None, f"offline: {unreachable}; HF_HUB_OFFLINE=1 uses a cached kernel without trying the network"
    commit = FA3_REVISIONS.get(repo, "")
    try:
        from kernels import get_kernel
        if not commit:
            from kernels._rust import KernelDependency, KernelVersion
            from kernels._versions import resolve_kernel_version
            commit = resolve_kernel_version(KernelDependency(repo_id=repo, version=KernelVersion.Version(FA3_VERSION)),
                                            local_files_only=constants.HF_HUB_OFFLINE)
        return get_kernel(repo, revision=commit, trust_remote_code=[repo]).flash_attn_interface, commit
    except Exception as e:
        where = f"{repo}@{commit or f'v{FA3_VERSION}'}"
        if constants.HF_HUB_OFFLINE or _is_offline(e):
            why = "HF_HUB_OFFLINE is set and it is not in the local cache" if constants.HF_HUB_OFFLINE else \
                f"cannot reach {constants.ENDPOINT}"
            return None, f"offline: {where}: {why} ({_first_line(e)[:160]})"
        return None, f"{where}: {_first_line(e)[:200]}"


def _check_flash_attention_3(kernel, head_dim, windows, seq_len, device="cuda"):
    """FA3's forward and backward at the model's head dim, windows and length, against the plain masked reference."""
    import torch
    gen = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(1, seq_len, 2, head_dim, generator=gen).to(device, torch.bfloat16) for _ in range(4))
    for window in sorted(set(windows)):
        results = []
        for attend in (lambda *t: Attention(kernel, "", "").flash_attn_func(*t, causal=True, window_size=(window, 0)),
                       lambda *t: _masked_attention(*(x.float().transpose(1, 2) for x in t), window).transpose(1, 2)):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            y = attend(*leaves)
            y.backward(dy)
            results.append([y.float(), *(torch.zeros_like(t) if t.grad is None else t.grad.float() for t in leaves)])
        for name, ours, ref in zip(("output", "dq", "dk", "dv"), *results):
            error, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
            if not error <= 0.03 * max(scale, 1.0):   # bf16 rounding, with room; a wrong mask is off by O(1)
                raise RuntimeError(f"{name} at window {window} differs from masked attention by {error:.3g}")


def load_attention(device, head_dim, windows, seq_len):
    """
    The attention of this run, decided once: Flash Attention 3 when it loads and passes a forward and backward
    check at the model's head dim and windows, else the PyTorch fallback (flex_attention + SDPA; SDPA on the CPU).
    """
    import torch
    if torch.device(device).type != "cuda":
        return Attention(None, "sdpa-cpu", "PyTorch SDPA with an explicit sliding-window mask (CPU; FA3 and "
                                           "flex_attention need a GPU)")
    repo = FA3_REPO_HOPPER if torch.cuda.get_device_capability() == (9, 0) else FA3_REPO_OTHER
    kernel, commit = _fetch_flash_attention_3(repo)
    why = commit
    if kernel is not None:
        try:
            _check_flash_attention_3(kernel, head_dim, windows, seq_len)
            pinned = "pinned" if FA3_REVISIONS.get(repo) else f"NOT pinned: v{FA3_VERSION} resolved now, see README"
            return Attention(kernel, f"fa3:{repo}@{commit[:12]}", f"Flash Attention 3, {repo}@{commit} ({pinned})")
        except Exception as e:
            why = f"{repo}@{commit} fails its check at head_dim {head_dim}: {_first_line(e)[:200]}"
    for window in set(windows):   # built here, once, not inside the compiled graph
        if 0 <= window < seq_len - 1:
            _sliding_window_mask(window, seq_len, torch.device(device))
    return Attention(None, "flex+sdpa", f"PyTorch fallback, flex_attention (sliding windows) + causal SDPA, "
                                        f"slower than FA3; Flash Attention 3 unavailable: {why}")

# ---------------------------------------------------------------------------
# Fitting the GPU: the device batch that fits in memory
# ---------------------------------------------------------------------------

# Out-of-memory failures that are not torch.OutOfMemoryError: cuBLAS and cuDNN report theirs as RuntimeError
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS")


def _is_out_of_memory(e):
    import torch
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM_MESSAGES))


def fit_device_batch(model, B, T, autocast_ctx):
    """
    The largest of B, B/2, B/4, ... sequences of T tokens whose forward and backward fit in GPU memory.
    train.py keeps TOTAL_BATCH_SIZE, so more gradient accumulation makes up for a smaller device batch:
    the same optimisation, only slower. On the GPU the first try also compiles the model, with inputs laid
    out as the loader yields them (views of one (B, T + 1) buffer), so that training does not compile again.
    """
    import torch
    device = next(model.parameters()).device
    while True:
        try:
            rows = torch.zeros(B, T + 1, dtype=torch.long, device=device)
            with autocast_ctx:
                model(rows[:, :-1], rows[:, 1:]).backward()
            break
        except Exception as e:
            if B == 1 or not _is_out_of_memory(e):
                raise
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":   # free the failed attempt, and forget its peak
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(f"DEVICE_BATCH_SIZE = {B} runs out of GPU memory: using {B // 2} "
              f"(set it in train.py to skip this search)")
        B //= 2
    model.zero_grad(set_to_none=True)
    return B

# ---------------------------------------------------------------------------
# Evaluation (DO NOT CHANGE — this is the fixed metric)
# ---------------------------------------------------------------------------


def _check_causal(model, batch, before, cuts, vocab_size):
    """
    Change the future of two rows at once; no logit before a row's own change may move (nor leak across rows).
    `batch` holds the rows (B, T + 1) whose logits were scored; `before[row]` the first cuts[row] of them.
    """
    import torch
    T = batch.size(1) - 1
    probe = batch.clone()   # sliced below exactly as the scored batch was: the same layout, no new compile
    gen = torch.Generator().manual_seed(0)
    for row, cut in enumerate(cuts):
        shift = torch.randint(1, vocab_size, (T - cut,), generator=gen).to(batch.device)
        probe[row, cut:T] = (batch[row, cut:T] + shift) % vocab_size   # every input from `cut` on differs
    probe_logits = model(probe[:, :-1])
    after = [probe_logits[row, :cut].float().clone() for row, cut in enumerate(cuts)]   # small copies
    del probe_logits
    for row, cut in enumerate(cuts):
        tolerance = 2 ** -7 * max(1.0, before[row].abs().max().item())   # bf16 rounding noise
        moved = (before[row] - after[row]).abs().max().item()
        if not moved <= tolerance:
            raise HarnessError(
                f"the model sees the future: changing tokens from position {cut} of row {row} moved earlier "
                f"logits by {moved:.4g} (tolerance {tolerance:.2g}); attention must be causal and rows "
                f"independent, so no val_bpb is reported")


def evaluate_bpb(model, tokenizer, batch_size):
    """
    Bits per byte on the validation shard: the same EVAL_TOKENS // MAX_SEQ_LEN rows for any batch size.
    The model gets inputs only and returns logits (B, T, V); the loss is computed here. At most one batch
    of logits is alive at a time: each is freed before the next forward, the causality probe's included.
    """
    import torch
    import torch.nn.functional as F
    with torch.no_grad():
        T, n_rows = MAX_SEQ_LEN, EVAL_TOKENS // MAX_SEQ_LEN
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        vocab_size = tokenizer.get_vocab_size()
        token_bytes = get_token_bytes(device)
        rows = validation_rows(tokenizer, T, n_rows)
        total_nats = torch.zeros((), dtype=torch.float64, device=device)
        total_bytes = torch.zeros((), dtype=torch.int64, device=device)
        done = 0
        while done < n_rows:
            b = min(batch_size, n_rows - done)
            batch = torch.from_numpy(rows[done:done + b].astype(np.int64)).to(device)
            x, y = batch[:, :-1], batch[:, 1:]   # views with row stride T + 1, as the training loader yields
            logits = model(x)
            if not (torch.is_tensor(logits) and logits.dim() == 3 and logits.shape[:2] == (b, T)
                    and logits.shape[2] >= vocab_size):
                shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
                raise HarnessError(f"model(x) must return logits of shape (B, T, >= {vocab_size}), got {shape}")
            if done == 0:   # the causality probe compares these positions: copied, so that the batch can go
                cuts = [T // 2, T // 4][:b]
                before = [logits[row, :cut].float().clone() for row, cut in enumerate(cuts)]
            for i in range(0, b, 8):   # in chunks, so that float32 log-probs never need a second full copy
                nats = F.cross_entropy(logits[i:i + 8].float().flatten(0, 1), y[i:i + 8].flatten(), reduction="none")
                nbytes = token_bytes[y[i:i + 8].flatten()]
                total_nats += (nats * (nbytes > 0)).sum(dtype=torch.float64)
                total_bytes += nbytes.sum(dtype=torch.int64)
            del logits, nats   # before the next forward: one batch of logits alive at a time
            if done == 0:
                _check_causal(model, batch, before, cuts, vocab_size)
                del before
            done += b
        return total_nats.item() / (math.log(2) * total_bytes.item())

# ---------------------------------------------------------------------------
# Smoke run: the current train.py at toy size through this harness, on the GPU if there is one, else the CPU
# ---------------------------------------------------------------------------

SMOKE_SEQ_LEN = 128                    # MAX_SEQ_LEN of a smoke run
SMOKE_EVAL_TOKENS = 16 * SMOKE_SEQ_LEN   # EVAL_TOKENS of a smoke run: 16 validation rows
SMOKE_STEPS = 3                          # timed steps (AUTORESEARCH_STEP_BUDGET), after the UNTIMED_STEPS
SMOKE_SIZE = dict(DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=64, DEVICE_BATCH_SIZE=4,   # train.py's lines replaced
                  TOTAL_BATCH_SIZE=2 * 4 * SMOKE_SEQ_LEN)                       # 2 micro-steps per step


def smoke_script(src, seq_len=SMOKE_SEQ_LEN, eval_tokens=SMOKE_EVAL_TOKENS, **edits):
    """
    train.py's source at toy size: each line `NAME = ...` of SMOKE_SIZE (and of `edits`, which must exist)
    replaced, and the harness's sequence length and evaluation size shrunk in that process only.
    """
    for name, value in {**SMOKE_SIZE, **edits}.items():
        src, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", src, flags=re.M)
        if n != 1 and name in edits:
            raise HarnessError(f"train.py has no single line `{name} = ...` to set")
    shrink = (f"import prepare  # smoke run: the harness's constants shrunk in this process only\n"
              f"prepare.MAX_SEQ_LEN = MAX_SEQ_LEN = {seq_len}\nprepare.EVAL_TOKENS = {eval_tokens}\n")
    src, n = re.subn(r"^from prepare import (\([^)]*\)|.*)$", lambda m: m.group(0) + "\n" + shrink, src,
                     count=1, flags=re.M)
    if n != 1:
        raise HarnessError("train.py has no line `from prepare import ...`: it must take the harness from prepare.py")
    return src


def run_smoke(train_path=None, steps=SMOKE_STEPS):
    """Run a toy-size copy of train.py (the current one, with the agent's edits) to its summary block; its exit code."""
    import subprocess
    import sys
    import tempfile
    train_path = Path(train_path or Path(__file__).with_name("train.py"))
    try:
        Tokenizer.from_directory()
        list_shards("val"), list_shards("train")
    except HarnessError:
        raise HarnessError(f"--smoke needs a prepared cache and {DATA_DIR.parent} has none: run `uv run prepare.py` "
                           f"first (or with --source DIR)") from None
    size = ", ".join(f"{k}={v}" for k, v in SMOKE_SIZE.items())
    print(f"smoke: {train_path} at toy size ({size}, MAX_SEQ_LEN={SMOKE_SEQ_LEN}), {steps} timed steps, "
          f"on the GPU if there is one; data: {DATASET}", flush=True)
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
    global DATA_DIR, TOKENIZER_DIR, DATASET
    parser = argparse.ArgumentParser(description="Download the data and train the tokenizer (run once).")
    parser.add_argument("--num-shards", type=int, default=10, help="training shards to download, -1 = all (default 10)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--source", metavar="DIR", help="use local parquet files with a `text` column instead of downloading")
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
    DATA_DIR, TOKENIZER_DIR = root / "data", root / "tokenizer"
    t0 = time.time()
    print(f"cache: {CACHE_DIR}")
    lock_cache(exclusive=True)
    for orphan in CACHE_DIR.rglob(".*.tmp"):   # left by a run that was killed mid-write
        orphan.unlink(missing_ok=True)
    if args.dataset:
        done, converted = convert_dataset(name, args.text_column or "text")
        print(f"data: {done['train_shards']} training shards ({done['train_docs']:,} documents) + validation "
              f"({done['validation']}), {'converted' if converted else 'already'} in {DATA_DIR}")
    elif args.source:
        n_train, val_name, copied = copy_source(args.source)
        print(f"data: {n_train} training shards + validation ({val_name}) from {args.source}, "
              f"{copied} copied into {DATA_DIR}")
    else:
        fetched, present = download_data(args.num_shards, args.download_workers)
        print(f"data: {fetched} shards downloaded, {present} already present, in {DATA_DIR}")
    seconds = train_tokenizer()
    if seconds is None:
        print(f"tokenizer: up to date in {TOKENIZER_DIR}")
    else:
        print(f"tokenizer: trained {VOCAB_SIZE} tokens in {seconds:.1f}s, saved to {TOKENIZER_DIR}")
    t1 = time.time()
    tokenizer = Tokenizer.from_directory(check_metric_files=False)
    written = cache_tokens(tokenizer)
    validation_rows(tokenizer, MAX_SEQ_LEN, EVAL_TOKENS // MAX_SEQ_LEN)
    print(f"tokens: {written} shards tokenized into {_tokens_dir(tokenizer)} in {time.time() - t1:.1f}s, "
          f"validation rows packed")
    if name:   # the pointer that makes this dataset the active one for train.py
        _atomic_write(CACHE_DIR / "dataset.txt", lambda tmp: tmp.write_text(name + "\n"))
    else:
        (CACHE_DIR / "dataset.txt").unlink(missing_ok=True)
    DATASET = read_source(DATA_DIR)["dataset"]
    print(f"done in {time.time() - t0:.1f}s: dataset {DATASET} is active, now run `uv run train.py`")
    if dataset_root(configured_dataset()) != root:
        print(f"note: AUTORESEARCH_DATASET={os.environ['AUTORESEARCH_DATASET']} is set and overrides this for train.py")


if __name__ == "__main__":
    main()
