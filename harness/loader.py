"""
The dataloader: BOS-aligned best-fit packing of a split's documents (from the token cache, or tokenized on the
fly) into rows that start with BOS and hold no padding; the training batches and the validation rows.
"""

import bisect
import collections

import numpy as np

from harness.errors import HarnessError
from harness.records import cache_packed_rows, packed_rows_file, read_record
from harness.tokens import cached_tokens, token_dtype, tokenize_shard

LOADER_BUFFER = 1000   # tokenized documents kept for best-fit packing


def document_batches(tokenizer, paths, full=False):
    """Tokenized documents of a split's shards in a fixed order, one tokenizer batch at a time, forever:
    (docs, epoch). `full`: check cached token files by content (the validation shard), not by size."""
    epoch = 1
    while True:
        for path in paths:
            try:
                if epoch == 1 or len(paths) > 1:   # a one-shard split (validation) is read once, not on every pass
                    cached = cached_tokens(path, tokenizer, full=full)   # None: not in the token cache
                    tokens, offsets, batches = cached if cached is not None else tokenize_shard(path, tokenizer)
            except (OSError, ValueError) as e:   # pyarrow raises ArrowInvalid (a ValueError) on corrupt data
                raise HarnessError(f"cannot read {path} ({e}): delete it and run `uv run prepare.py` again") from None
            for b0, b1 in zip(batches[:-1].tolist(), batches[1:].tolist()):
                yield [tokens[offsets[i]:offsets[i + 1]] for i in range(b0, b1)], epoch
        epoch += 1


class BestFitPacker:
    """Fills rows left to right from a buffer of LOADER_BUFFER documents: the largest document that fits, else the
    shortest one cropped to fill the row; among equal lengths the oldest first. Documents wait in per-length
    queues, so a choice is a bisection over the distinct lengths, not a scan of the buffer."""

    def __init__(self, tokenizer, paths, full=False):
        self.batches = document_batches(tokenizer, paths, full)
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
                    if len(doc) not in self.by_length:
                        self.by_length[len(doc)] = collections.deque()
                        bisect.insort(self.lengths, len(doc))
                    self.by_length[len(doc)].append(doc)
                self.size += len(docs)
            doc = self._take(n - pos)[:n - pos]
            row[pos:pos + len(doc)] = doc
            pos += len(doc)
        return self.epoch


def make_dataloader(tokenizer, B, T, paths, device=None):
    """Yield (inputs, targets, epoch) forever: B packed rows of the shards `paths`, int64 on `device` (CUDA when
    available by default), copied through a pinned host buffer without blocking."""
    import torch
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_cuda = device.type == "cuda"
    packer = BestFitPacker(tokenizer, paths)
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


def packed_rows(tokenizer, T, n_rows, paths):
    """The first n_rows packed rows of a one-shard split (validation, test), (n_rows, T + 1): read from the cache
    when the file there matches its record, else packed now (and cached, if the cache can be written)."""
    path = None
    if tokenizer.id:
        path, made_from = packed_rows_file(paths[0], tokenizer.id, T, n_rows)
        if read_record(path, made_from):
            return np.load(path, allow_pickle=False)
    packer = BestFitPacker(tokenizer, paths, full=True)
    rows = np.empty((n_rows, T + 1), dtype=token_dtype(tokenizer.get_vocab_size()))
    for row in rows:
        packer.fill(row)
    if path is not None:
        cache_packed_rows(path, rows, made_from)
    return rows
