"""
The token cache: the validation shard and the first training shards tokenized once, at prepare time, into
tokens/<tokenizer id>/ beside the data they come from, each file with its record. The loader reads a shard from
here when the cache holds this exact file for this tokenizer, and tokenizes it on the fly otherwise.
"""

import itertools
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from harness.errors import HarnessError
from harness.records import read_record, record_path, save_npy, shard_sha256, write_cache_file

TOKEN_CACHE_SHARDS = 64   # training shards tokenized at prepare time; later ones on the fly
TOKENIZER_BATCH = 128     # documents tokenized together, as the reference's loader batches them


def token_dtype(vocab_size):
    """The dtype of token files and validation rows: the smallest that holds every id."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenize_shard(path, tokenizer):
    """All documents of a shard in reading order, BOS first in each: (tokens, offsets, batches). Document i is
    tokens[offsets[i]:offsets[i + 1]]; the loader takes them in the reference's tokenizer batches (row group by
    row group, TOKENIZER_BATCH at a time), whose bounds are `batches`."""
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
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=token_dtype(tokenizer.get_vocab_size()),
                         count=offsets[-1])
    return tokens, offsets, np.array(batches, dtype=np.int64)


def tokens_dir(root, tokenizer):
    """A dataset root's token files, one directory per tokenizer (None for a tokenizer not saved to the cache)."""
    return Path(root) / "tokens" / tokenizer.id if tokenizer.id else None


def cached_tokens(path, tokenizer, full=False):
    """
    A shard's cached (tokens, offsets, batches) for the loader, or None if the cache does not hold this exact file
    for this tokenizer: checked against the records by content when `full` (the validation shard), else by size;
    never an id beyond the vocabulary.
    """
    out = tokens_dir(Path(path).parent.parent, tokenizer)
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


def cache_tokens(tokenizer, shards):
    """
    Tokenize shards (of one data directory: the validation shard and the first training shards) into the cache,
    each checked by content against its record first. Returns how many were written.
    """
    out = tokens_dir(shards[0].parent.parent, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.iterdir():   # token files of an older tokenizer
        if stale != out:
            shutil.rmtree(stale, ignore_errors=True)
    written = 0
    for path in shards:
        if cached_tokens(path, tokenizer, full=True) is not None:
            continue
        tokens, offsets, batches = tokenize_shard(path, tokenizer)
        max_id = int(tokens.max()) if len(tokens) else 0
        if max_id >= tokenizer.get_vocab_size():
            raise HarnessError(f"tokenizing {path} gave id {max_id} >= {tokenizer.get_vocab_size()}: this is a bug")
        stem, made_from = path.name.removesuffix(".parquet"), {"shard": shard_sha256(path), "tokenizer": tokenizer.id}
        record_path(out / f"{stem}.index.npz").unlink(missing_ok=True)
        write_cache_file(out / f"{stem}.tokens.npy", lambda tmp: save_npy(tmp, tokens), made_from, tokens.nbytes,
                         max_id=max_id)
        write_cache_file(out / f"{stem}.index.npz", lambda tmp: save_npy(   # its record, last, marks completion
            tmp, offsets=offsets, batches=batches), made_from, offsets.nbytes + batches.nbytes)
        written += 1
    return written
