"""
Where a dataset lives in the cache: the default one in CACHE_DIR, a --source DIR in CACHE_DIR/sources/<slug>, a
--dataset NAME in CACHE_DIR/datasets/<slug>, each with data/ (parquet shards), tokenizer/ and tokens/; which one
is active (the last `prepare.py` command chose it, AUTORESEARCH_DATASET overrides); and the shards of a split.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq

from harness.errors import HarnessError

DATASET_REPO = "karpathy/climbmix-400b-shuffle"   # the default dataset on the Hugging Face hub
MAX_SHARD = 6542                                  # its shards are shard_00000 ... shard_06542
VAL_FILENAME = f"shard_{MAX_SHARD:05d}.parquet"   # the last shard is pinned for validation, in every dataset
TEST_FILENAME = f"shard_{MAX_SHARD - 1:05d}.parquet"   # the one before it for the test split, never trained on
SPLITS = {"val": VAL_FILENAME, "test": TEST_FILENAME}   # one-shard splits; "train" is every other shard


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def dataset_name(name):
    """A local directory is named by its absolute path, as load_dataset would read it; anything else is a hub name."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def dataset_root(name, cache_dir):
    """Where a dataset's data/, tokenizer/ and tokens/ live: 'owner/name' -> datasets/owner--name, a local
    directory -> datasets/local--<its name>-<hash of its path>, 'local:<path>' (--source) -> sources/..."""
    if name == DATASET_REPO:
        return Path(cache_dir)
    parent = "datasets"
    if name.startswith("local:"):
        parent, name = "sources", name.removeprefix("local:")
    slug = f"local--{Path(name).name}-{hashlib.sha256(name.encode()).hexdigest()[:8]}" if os.path.isabs(name) else name
    slug = re.sub(r"[^A-Za-z0-9._-]", "", slug.replace("/", "--"))
    if not slug.strip(".") or parent == "sources" and not os.path.isabs(name):
        raise HarnessError(f"{name!r} is not a dataset name")
    return Path(cache_dir) / parent / slug


def read_source(data_dir):
    """Where a data directory's shards come from, in source.json beside it: {"dataset": name, ...}, or {}."""
    try:
        return json.loads(Path(data_dir).with_name("source.json").read_text())
    except (OSError, ValueError):
        return {}


def configured_dataset(cache_dir):
    """(name, where it was chosen): AUTORESEARCH_DATASET if set, else CACHE_DIR/dataset.txt (written by
    prepare.py), else the default dataset."""
    name = os.environ.get("AUTORESEARCH_DATASET", "").strip()
    if name:
        return dataset_name(name), "AUTORESEARCH_DATASET"
    try:
        name = (Path(cache_dir) / "dataset.txt").read_text().strip()
    except OSError:
        pass
    return (dataset_name(name), f"{Path(cache_dir) / 'dataset.txt'}") if name else (DATASET_REPO, "the default")


def check_prepared(root, chosen_by):
    """A dataset that AUTORESEARCH_DATASET names must have been prepared: else one line that names the variable
    (a typo there would otherwise read as a cache that lost its files)."""
    if chosen_by == "AUTORESEARCH_DATASET" and not Path(root).is_dir():
        raise HarnessError(f"AUTORESEARCH_DATASET={os.environ.get('AUTORESEARCH_DATASET')} names a dataset that was "
                           f"never prepared (nothing at {root}): check its spelling, unset it to use the dataset "
                           f"that `uv run prepare.py` made active, or prepare it with `uv run prepare.py --dataset "
                           f"NAME` (or --source DIR)")


def list_shards(split, data_dir, chosen_by=None):
    """Parquet shards of a split: 'val' and 'test' are one pinned shard each, 'train' every other shard. `chosen_by`
    names what made this dataset the active one, for the line that says none is there."""
    data_dir = Path(data_dir)
    names = sorted(p.name for p in data_dir.glob("shard_*.parquet")) if data_dir.is_dir() else []
    if split not in ("train", *SPLITS):
        raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
    names = [n for n in names if n == SPLITS[split]] if split in SPLITS else \
        [n for n in names if n not in SPLITS.values()]
    if not names:
        what = {"val": "validation shard", "test": "test shard", "train": "training shards"}[split]
        check_prepared(data_dir.parent, chosen_by)
        raise HarnessError(f"no {what} in {data_dir}: run `uv run prepare.py` (or with --source DIR or --dataset NAME)")
    return [data_dir / n for n in names]


def check_shard(path, column="text"):
    """The number of rows of a readable parquet file with a non-empty string column `column`, else HarnessError."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise HarnessError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
    field = pf.schema_arrow.field(column) if column in pf.schema_arrow.names else None
    if field is None or str(field.type) not in ("string", "large_string"):
        raise HarnessError(f"{path} has no string column named {column!r} (columns: {pf.schema_arrow.names}): "
                           f"name its text column with --text-column COL")
    if pf.metadata.num_rows == 0:
        raise HarnessError(f"{path} has no rows")
    return pf.metadata.num_rows
