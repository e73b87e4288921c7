"""
Data from anywhere else: --source DIR mirrors a directory of parquet files into the cache under the canonical
shard names (the last file, or shard_06542.parquet, for validation); --dataset NAME streams any `datasets`
dataset (on the hub, or a local directory) into shards, its validation split (or else its last documents) held
out. Either way a crash leaves nothing trusted, and the first line of a failure says what to do.
"""

import collections
import itertools
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from harness.datasets import MAX_SHARD, TEST_FILENAME, VAL_FILENAME, check_shard, read_source, shard_name
from harness.download import check_reachable
from harness.errors import HarnessError, first_line
from harness.records import claim, read_record, record_path, sha256, write_cache_file, write_source

SHARD_DOCS = 100_000                     # --dataset: documents per shard written, at most
SHARD_CHARS = 250_000_000                # --dataset: characters per shard, at most (long documents)
ROW_GROUP_DOCS = 1024                    # --dataset: documents per parquet row group
HOLDOUT_DOCS = 50_000                    # --dataset validation: its validation split, or else 1% of train held out,
HOLDOUT_CHARS = 100_000_000              #   at most this many documents and characters


def check_source(source, cache_dir):
    """A --source directory, resolved; one inside the cache is refused (filling from it would delete it)."""
    source = Path(source)
    if not source.is_dir():
        raise HarnessError(f"--source {source} is not a directory")
    source, cache = source.resolve(), Path(cache_dir).resolve()
    if source == cache or cache in source.parents:
        raise HarnessError(f"--source {source} is inside the cache {cache}: give a directory of your own parquet files")
    return source


def copy_source(source, data_dir, cache_dir, column="text"):
    """Mirror a directory of parquet files into the cache under canonical shard names, verified by content: the
    validation file (shard_06542.parquet, else the last), the test file (shard_06541.parquet, else the one before
    the validation file, if there are 3 or more) and the training files. A text column of another name is copied
    as `text`, the only column the loader reads."""
    source, data_dir = check_source(source, cache_dir), Path(data_dir)
    files = sorted(source.glob("*.parquet"))
    if len(files) < 2:
        raise HarnessError(f"--source {source} needs at least 2 parquet files (training + validation), "
                           f"found {len(files)}")
    val = next((f for f in files if f.name == VAL_FILENAME), files[-1])
    rest = [f for f in files if f != val]
    test = next((f for f in rest if f.name == TEST_FILENAME), rest[-1] if len(rest) >= 2 else None)
    train = [f for f in rest if f != test]
    if len(train) > MAX_SHARD - 1:
        raise HarnessError(f"--source {source} has {len(train)} training files, more than the {MAX_SHARD - 1} shard "
                           f"names (shard_00000 ... shard_{MAX_SHARD - 2:05d}): use at most {MAX_SHARD + 1} files")
    plan = {VAL_FILENAME: val, **({TEST_FILENAME: test} if test else {}),
            **{shard_name(i): f for i, f in enumerate(train)}}
    for src in plan.values():
        check_shard(src, column)
    claim(data_dir, f"local:{source}")
    for stale in data_dir.glob("shard_*.parquet"):
        if stale.name not in plan:
            stale.unlink()
            record_path(stale).unlink(missing_ok=True)
    copied = 0
    for name, src in plan.items():
        made_from = {"source": str(src), "sha256": sha256(src), **({"text_column": column} if column != "text" else {})}
        if read_record(data_dir / name, made_from):
            continue
        write = (lambda tmp: shutil.copyfile(src, tmp)) if column == "text" else \
            (lambda tmp: pq.write_table(pq.read_table(src, columns=[column]).rename_columns(["text"]), tmp))
        write_cache_file(data_dir / name, write, made_from, src.stat().st_size)
        copied += 1
    return len(train), val.name, test and test.name, copied


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
    write_cache_file(path, lambda tmp: pq.write_table(table, tmp, row_group_size=ROW_GROUP_DOCS,
                                                       compression="zstd"), made_from)


def _converted(data_dir, done):
    """Whether data_dir holds exactly the shards of the conversion recorded in `done`, each matching its record."""
    made_from = {"dataset": done.get("dataset"), "text_column": done.get("text_column")}
    shards = sorted(data_dir.glob("shard_*.parquet"))
    return (len(shards) == done.get("train_shards", -1) + 2 and "test" in done
            and all(read_record(p, made_from) for p in shards))


def convert_dataset(name, column, data_dir):
    """
    Stream a `datasets` dataset into shards: its validation split ("validation" or "valid"; else the last
    documents of train but the test's) becomes the pinned validation shard, its "test" split (else the very last
    documents of train) the test shard. Returns (source.json, whether converted now).
    """
    data_dir = Path(data_dir)
    done = read_source(data_dir)
    if (done.get("dataset"), done.get("text_column")) == (name, column) and _converted(data_dir, done):
        return done, False
    if not Path(name).is_dir():
        check_reachable(name)
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
    val = next((s for s in ("validation", "valid") if s in splits and s != train), None)
    test = "test" if "test" in splits and train != "test" else None
    staging = data_dir.with_name("data.partial")   # becomes data_dir once complete: a crash leaves nothing trusted
    made_from = {"dataset": name, "text_column": column}
    try:
        held = lambda split: next(_chunks(_texts(splits[split], name, column), HOLDOUT_DOCS, HOLDOUT_CHARS), []) \
            if split else []
        val_docs, test_docs = held(val), held(test)
        docs = _texts(splits[train], name, column)
        first = next(docs, None)   # a missing column or an empty dataset fails before anything is written
        if first is None:
            raise HarnessError(f"{name} has no documents in its {train!r} split (column {column!r})")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        docs = itertools.chain([first], docs)
        if not test_docs:   # the very last documents of train
            test, docs = None, _hold_out_last(docs, test_docs)
        if not val_docs:    # the ones before those
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
        raise HarnessError(f"{name} has only {len(val_docs) + len(test_docs)} document(s): too few to train on")
    _write_docs(staging / VAL_FILENAME, val_docs, made_from)
    _write_docs(staging / TEST_FILENAME, test_docs, made_from)
    done = dict(dataset=name, text_column=column, train_shards=n_shards, train_docs=n_docs,
                validation=f"split {val!r}" if val else f"last {len(val_docs)} documents of {train!r} but the test's",
                validation_docs=len(val_docs),
                test=f"split {test!r}" if test else f"last {len(test_docs)} documents of {train!r}",
                test_docs=len(test_docs))
    data_dir.with_name("source.json").unlink(missing_ok=True)
    shutil.rmtree(data_dir, ignore_errors=True)   # shards of an older conversion are never mixed with these
    os.replace(staging, data_dir)
    write_source(data_dir, **done)   # written last: marks completion
    return done, True


