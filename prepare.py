"""
The frozen harness that train.py imports: the constants that define the metric, the active dataset, the
tokenizer, the dataloader, the training budget, the GPU, attention, and the fixed metric `val_bpb`.

    uv run prepare.py           # once: get the data, train the tokenizer, fill the token cache (docs/data.md)
    uv run prepare.py --smoke   # the current train.py at toy size, to its summary block

build.py, frozen too, holds what this file calls and the agent never needs to read: the command line, what
builds the cache, the records every cache file is checked against, and the attention kernels.
"""

import base64
import bisect
import collections
import hashlib
import itertools
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tiktoken

# ---------------------------------------------------------------------------
# Constants that define the metric (fixed, do not modify; a user may, once, before a night: docs/gpu.md)
# ---------------------------------------------------------------------------

MAX_SEQ_LEN = 2048              # context length, also the fixed eval sequence length
TIME_BUDGET = 300               # seconds of training (excluding startup and compile warm-up)
EVAL_TOKENS = 40 * 524288       # tokens scored by the validation metric
VOCAB_SIZE = 8192               # tokenizer size, special tokens included

# ---------------------------------------------------------------------------
# Data and loader settings
# ---------------------------------------------------------------------------

DATASET_REPO = "karpathy/climbmix-400b-shuffle"   # the default dataset on the Hugging Face hub
MAX_SHARD = 6542                                  # its shards are shard_00000 ... shard_06542
VAL_FILENAME = f"shard_{MAX_SHARD:05d}.parquet"   # the last shard is pinned for validation
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]                     # starts every document
TOKENIZER_BATCH = 128                             # documents tokenized together by the dataloader
LOADER_BUFFER = 1000                              # tokenized documents kept for best-fit packing
TOKEN_DTYPE = np.uint16 if VOCAB_SIZE <= 1 << 16 else np.uint32   # of token files and validation rows

# Smoke and test runs stop after this many timed steps instead of TIME_BUDGET seconds, and drive the schedules
# by steps, so that their outcome never depends on the machine's speed. 0 (unset) in a real run.
STEP_BUDGET = int(os.environ.get("AUTORESEARCH_STEP_BUDGET") or 0)
CACHE_DIR = Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")


class HarnessError(SystemExit):
    """A failure the user can fix: exits with code 1 and one line saying what to do."""

    def __init__(self, message):
        super().__init__(f"prepare.py: {message}")

# ---------------------------------------------------------------------------
# The active dataset: the default one in CACHE_DIR, a --source DIR in CACHE_DIR/sources/<slug>, or a
# --dataset NAME in CACHE_DIR/datasets/<slug>; the last `prepare.py` command chose it
# ---------------------------------------------------------------------------


def dataset_name(name):
    """A local directory is named by its absolute path, as load_dataset would read it; anything else is a hub name."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def dataset_root(name):
    """Where a dataset's data/, tokenizer/ and tokens/ live: 'owner/name' -> datasets/owner--name, a local
    directory -> datasets/local--<its name>-<hash of its path>, 'local:<path>' (--source) -> sources/..."""
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


def configured_dataset():
    """AUTORESEARCH_DATASET if set, else CACHE_DIR/dataset.txt (written by prepare.py), else the default."""
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


def list_shards(split, data_dir=None):
    """Parquet shards of a split: 'train' is every shard but the pinned validation one."""
    data_dir = Path(data_dir or DATA_DIR)
    names = sorted(p.name for p in data_dir.glob("shard_*.parquet")) if data_dir.is_dir() else []
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    names = [n for n in names if (n == VAL_FILENAME) == (split == "val")]
    if not names:
        what = "validation shard" if split == "val" else "training shards"
        raise HarnessError(f"no {what} in {data_dir}: run `uv run prepare.py` (or with --source DIR or --dataset NAME)")
    return [data_dir / n for n in names]

# ---------------------------------------------------------------------------
# Tokenizer: BPE trained by build.py with rustbpe, run with tiktoken
# ---------------------------------------------------------------------------


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
        """The saved tokenizer, once build.py has checked the files the metric depends on against their records
        (tokenizer, token byte lengths, validation shard and rows) and taken a shared lock on the cache, held until
        the process exits, so that no prepare.py rewrites them under a run."""
        from build import check_metric_files as check
        meta, sha = check(Path(tokenizer_dir or TOKENIZER_DIR), all_files=check_metric_files)
        return cls(_encoding_from_meta(meta), id=sha[:16])

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
    from build import checked_token_bytes
    return torch.from_numpy(checked_token_bytes(Path(tokenizer_dir or TOKENIZER_DIR))).to(device)

# ---------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing, of the shards' tokens from the token cache (build.py fills it with the
# validation shard and the first training shards) or tokenized on the fly
# ---------------------------------------------------------------------------


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
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=TOKEN_DTYPE, count=offsets[-1])
    return tokens, offsets, np.array(batches, dtype=np.int64)


def _document_batches(tokenizer, split):
    """Tokenized documents of a split in a fixed order, one tokenizer batch at a time, forever: (docs, epoch)."""
    from build import cached_tokens
    paths = list_shards(split)
    epoch = 1
    while True:
        for path in paths:
            try:
                if epoch == 1 or len(paths) > 1:   # a one-shard split (validation) is read once, not on every pass
                    cached = cached_tokens(path, tokenizer, full=split == "val")   # None: not in the token cache
                    tokens, offsets, batches = cached if cached is not None else tokenize_shard(path, tokenizer)
            except (OSError, ValueError) as e:   # pyarrow raises ArrowInvalid (a ValueError) on corrupt data
                raise HarnessError(f"cannot read {path} ({e}): delete it and run `uv run prepare.py` again") from None
            for b0, b1 in zip(batches[:-1].tolist(), batches[1:].tolist()):
                yield [tokens[offsets[i]:offsets[i + 1]] for i in range(b0, b1)], epoch
        epoch += 1


class _BestFitPacker:
    """Fills rows left to right from a buffer of LOADER_BUFFER documents: the largest document that fits, else the
    shortest one cropped to fill the row; among equal lengths the oldest first. Documents wait in per-length
    queues, so a choice is a bisection over the distinct lengths, not a scan of the buffer."""

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
                    if len(doc) not in self.by_length:
                        self.by_length[len(doc)] = collections.deque()
                        bisect.insort(self.lengths, len(doc))
                    self.by_length[len(doc)].append(doc)
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
    """The first n_rows packed validation rows, (n_rows, T + 1): read from the cache when the file there matches
    its record, else packed now (and cached, if the cache can be written)."""
    from build import cache_validation_rows, read_record, validation_rows_file
    path = None
    if tokenizer.id:
        list_shards("val")   # no validation shard: one line saying what to run
        path, made_from = validation_rows_file(Path(DATA_DIR).parent, tokenizer.id, T, n_rows)
        if read_record(path, made_from):
            return np.load(path, allow_pickle=False)
    packer = _BestFitPacker(tokenizer, "val")
    rows = np.empty((n_rows, T + 1), dtype=TOKEN_DTYPE)
    for row in rows:
        packer.fill(row)
    if path is not None:
        cache_validation_rows(path, rows, made_from)
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

# Fewer out-of-memory failures from fragmentation when the device batch or the model changes between runs. The
# caching allocator reads PYTORCH_CUDA_ALLOC_CONF, torch 2.9's generic config PYTORCH_ALLOC_CONF (and warns when
# only the older one is set): both, before CUDA first allocates.
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"

# Peak dense bf16 tensor-core FLOP/s from NVIDIA's datasheets, for MFU. Regex on the device name, first match
# wins; a GPU not listed gets MFU "unknown" rather than a number against the wrong peak.
GPU_PEAK_FLOPS = {
    r"H100 NVL|H200 NVL": 835.5e12, r"H100 PCIe": 756e12, r"H100 (80GB HBM3|SXM)|GH200": 989.5e12,
    r"H200": 989.5e12, r"A100": 312e12, r"L40S$": 362.05e12, r"L40$": 181.05e12, r"\bL4$": 121e12,
    r"\bA10$": 125e12, r"RTX 4090$": 165.2e12, r"RTX 3090$": 71e12,
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
# The commit of each repository that runs (a full 40-character sha), so that a push there never changes a
# night's kernel. "" = not pinned yet: the commit that its v1 branch points to at start-up runs, and the
# `attention:` line names it. docs/gpu.md says how to move a pin.
FA3_REVISIONS = {FA3_REPO_HOPPER: "", FA3_REPO_OTHER: ""}
FA3_VERSION = 1   # the kernels-hub version branch (v1) an unpinned repository resolves to


class Attention:
    """What train.py calls: flash_attn_func(q, k, v, causal=True, window_size=(window, 0)) on (B, T, H, D), FA3's
    signature, where query i attends to keys i - window ... i. `path` names the kernel for the summary block."""

    def __init__(self, kernel, path, description):
        from build import fallback_attention   # PyTorch: causal SDPA, flex_attention for sliding windows on a GPU
        self.kernel, self.path, self.description = kernel, path, description
        self.fallback = fallback_attention      # used when kernel is None

    def flash_attn_func(self, q, k, v, causal=True, window_size=(-1, -1)):
        if not causal or window_size[1] != 0:
            raise ValueError("the harness's attention is causal only: call it with causal=True, window_size=(w, 0)")
        q, k = q.to(v.dtype), k.to(v.dtype)   # one dtype: under autocast the QK-norm may return float32
        if self.kernel is None:
            return self.fallback(q, k, v, window_size[0])
        y = self.kernel.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        return y[0] if isinstance(y, tuple) else y


def load_attention(device, head_dim, windows, seq_len):
    """The attention of this run, decided once: Flash Attention 3 from the kernels hub, at its pinned commit, when it
    loads and passes a forward and backward check at the model's head dim and windows; else the slower PyTorch
    fallback (causal SDPA, flex_attention for sliding windows; an explicit mask on the CPU). build.py does both."""
    from build import choose_attention
    return Attention(*choose_attention(device, head_dim, windows, seq_len))

# ---------------------------------------------------------------------------
# Fitting the GPU: the device batch that fits in memory
# ---------------------------------------------------------------------------

def fit_device_batch(model, B, T, autocast_ctx):
    """The largest of B, B/2, B/4, ... sequences of T tokens whose forward and backward fit in GPU memory.
    train.py keeps TOTAL_BATCH_SIZE, so more gradient accumulation makes up for a smaller device batch:
    the same optimisation, only slower. On the GPU the first try also compiles the model, with inputs laid
    out as the loader yields them (views of one (B, T + 1) buffer), so that training does not compile again."""
    import torch
    from build import is_out_of_memory
    device = next(model.parameters()).device
    while True:
        try:
            rows = torch.zeros(B, T + 1, dtype=torch.long, device=device)
            with autocast_ctx:
                model(rows[:, :-1], rows[:, 1:]).backward()
            break
        except Exception as e:
            if B == 1 or not is_out_of_memory(e):
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
    """Change the future of two rows at once; no logit before a row's own change may move (nor leak across rows).
    `batch` holds the rows (B, T + 1) whose logits were scored; `before[row]` the first cuts[row] of them."""
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
    """Bits per byte on the validation shard: the same EVAL_TOKENS // MAX_SEQ_LEN rows for any batch size.
    The model gets inputs only and returns logits (B, T, V); the loss is computed here. At most one batch
    of logits is alive at a time: each is freed before the next forward, the causality probe's included."""
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


if __name__ == "__main__":
    from build import main   # the command line: build.py
    main()
