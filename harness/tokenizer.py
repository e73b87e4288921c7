"""
The BPE tokenizer: trained with rustbpe on the training shards (documents capped at TOKENIZER_MAX_DOC_CHARS, at
most TOKENIZER_MAX_CHARS in all), saved as its pattern and mergeable ranks, and run with tiktoken. The token byte
lengths saved beside it are what make the metric bits per *byte*.
"""

import base64
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tiktoken

from harness.datasets import read_source
from harness.errors import HarnessError
from harness.records import read_record, record_path, save_npy, shard_sha256, write_cache_file

SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]            # starts every document
# GPT-4's pre-tokenizer with \p{N}{1,2} instead of \p{N}{1,3}
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")
TOKENIZER_MAX_DOC_CHARS = 10_000         # each document is capped at this many characters
TOKENIZER_MAX_CHARS = 1_000_000_000      # characters of training text in all


def encoding_from_meta(meta):
    ranks = {base64.b64decode(s): rank for rank, s in enumerate(meta["mergeable_ranks"])}
    return tiktoken.Encoding("rustbpe", pat_str=meta["pattern"], mergeable_ranks=ranks,
                             special_tokens=meta["special_tokens"])


class Tokenizer:
    """The tiktoken encoding with the BOS convention the dataloader and train.py use."""

    def __init__(self, enc, id=None):
        self.enc = enc
        self.id = id   # a hash of the saved tokenizer: names its token cache
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

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


def _training_text(paths):
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


def _data_fingerprint(paths, vocab_size):
    """What the tokenizer depends on: the settings, the source and its shards' content. Any change: train again."""
    settings = [vocab_size, SPLIT_PATTERN, TOKENIZER_MAX_DOC_CHARS, TOKENIZER_MAX_CHARS]
    return settings + [read_source(paths[0].parent).get("dataset")] + [[p.name, shard_sha256(p, False)] for p in paths]


def train_tokenizer(train_paths, tokenizer_dir, vocab_size):
    """Train the BPE on the training shards; save the merges and the token byte lengths. Returns the seconds it
    took, or None if the saved tokenizer is up to date."""
    import rustbpe
    tokenizer_dir = Path(tokenizer_dir)
    fingerprint = _data_fingerprint(train_paths, vocab_size)
    meta_path = tokenizer_dir / "tokenizer.json"
    record = read_record(meta_path, fingerprint)
    if record and read_record(tokenizer_dir / "token_bytes.npy", {"tokenizer": record["sha256"]}):
        return None
    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    n_merged = vocab_size - len(SPECIAL_TOKENS)
    bpe.train_from_iterator(_training_text(train_paths), n_merged, pattern=SPLIT_PATTERN)
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
    tokenizer = Tokenizer(encoding_from_meta(meta))
    text = ("Hello world! Numbers 0, 12, 345 and 6789; punctuation?! (yes) -- tabs\tand\nnewlines. "
            "你好，世界。 Ünïcödé ✓")
    if tokenizer.decode(tokenizer.encode(text)) != text:
        raise HarnessError("the trained tokenizer does not round-trip text: this is a bug, please report it")
    token_bytes = np.zeros(vocab_size, dtype=np.int32)   # special tokens stay 0: they carry no bytes
    token_bytes[:n_ranks] = [len(bytes(b)) for b, _ in ranks]
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    record_path(tokenizer_dir / "token_bytes.npy").unlink(missing_ok=True)
    record = write_cache_file(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)), fingerprint)
    write_cache_file(tokenizer_dir / "token_bytes.npy", lambda tmp: save_npy(tmp, token_bytes),
                     {"tokenizer": record["sha256"]})   # its record, written last, marks completion
    return time.time() - t0
