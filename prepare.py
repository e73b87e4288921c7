"""
The frozen harness that train.py imports: the constants that define the metric, the active dataset, the
tokenizer, the dataloader, the training budget, the GPU, attention, and the fixed metric `val_bpb`.

    uv run prepare.py           # once: get the data, train the tokenizer, fill the token cache (docs/data.md)
    uv run prepare.py --smoke   # the current train.py at toy size, to its summary block

What this file imports from harness/ (frozen too) the agent never needs to read: the cache's records, the
download, the tokenizer's training, the token cache, the packing loader, the attention kernels, the command line.
"""

import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from harness import (attention, datasets, evaluations, gpu, integrity, loader, records, tokenizer as _tokenizer,
                     tokens)
from harness.attention import choose_attention
from harness.datasets import DATASET_REPO, VAL_FILENAME  # noqa: F401
from harness.errors import HarnessError
from harness.gpu import fit_device_batch, is_out_of_memory  # noqa: F401 (fit_device_batch: train.py's)
from harness.tokenizer import BOS_TOKEN, SPECIAL_TOKENS, encoding_from_meta, Tokenizer as _Tokenizer  # noqa: F401

# ---------------------------------------------------------------------------
# Constants that define the metric (fixed, do not modify; a user may, once, before a night: docs/gpu.md)
# ---------------------------------------------------------------------------

MAX_SEQ_LEN = 2048              # context length, also the fixed eval sequence length
TIME_BUDGET = 300               # seconds of training (excluding startup and compile warm-up)
EVAL_TOKENS = 40 * 524288       # tokens scored by the validation metric
VOCAB_SIZE = 8192               # tokenizer size, special tokens included

# Smoke and test runs stop after this many timed steps instead of TIME_BUDGET seconds, and drive the schedules
# by steps, so that their outcome never depends on the machine's speed. 0 (unset) in a real run.
STEP_BUDGET = int(os.environ.get("AUTORESEARCH_STEP_BUDGET") or 0)
CACHE_DIR = Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")

# ---------------------------------------------------------------------------
# The active dataset: the default one (DATASET_REPO, validation on its last shard VAL_FILENAME) in CACHE_DIR, or
# the --source DIR or --dataset NAME that the last `prepare.py` command chose (AUTORESEARCH_DATASET overrides)
# ---------------------------------------------------------------------------

_CHOSEN, CHOSEN_BY = datasets.configured_dataset(CACHE_DIR)   # CHOSEN_BY: what made it the active one
DATA_DIR = datasets.dataset_root(_CHOSEN, CACHE_DIR) / "data"
TOKENIZER_DIR = DATA_DIR.parent / "tokenizer"
DATASET = datasets.read_source(DATA_DIR).get("dataset") or _CHOSEN   # the active dataset's name, for the summary


def list_shards(split):
    """The active dataset's parquet shards of a split: 'train', 'val' or 'test'."""
    return datasets.list_shards(split, DATA_DIR, CHOSEN_BY)

# ---------------------------------------------------------------------------
# Tokenizer (BPE, trained by `uv run prepare.py` with rustbpe, run with tiktoken) and the dataloader
# ---------------------------------------------------------------------------


class Tokenizer(_Tokenizer):
    """encode(text or list, prepend=None), decode(ids), get_vocab_size(), get_bos_token_id(); BOS is BOS_TOKEN."""

    @classmethod
    def from_directory(cls, tokenizer_dir=None, check_metric_files=True):
        """The saved tokenizer, once the files the metric depends on (tokenizer, token byte lengths, validation
        shard and rows) match their records, under a shared lock on the cache held until the process exits, so
        that no prepare.py rewrites them under a run."""
        datasets.check_prepared(DATA_DIR.parent, CHOSEN_BY)
        meta, sha = records.check_metric_files(Path(tokenizer_dir or TOKENIZER_DIR), CACHE_DIR, MAX_SEQ_LEN,
                                               EVAL_TOKENS // MAX_SEQ_LEN, all_files=check_metric_files)
        return cls(encoding_from_meta(meta), id=sha[:16])


def get_token_bytes(device="cpu", tokenizer_dir=None):
    """UTF-8 byte length of every token id (0 for special tokens), as an int32 tensor: checked against its record and
    recomputed from the tokenizer."""
    import torch
    return torch.from_numpy(records.checked_token_bytes(Path(tokenizer_dir or TOKENIZER_DIR))).to(device)


def make_dataloader(tokenizer, B, T, split, device=None):
    """Yield (inputs, targets, epoch) forever: B rows of T + 1 tokens packed best-fit from a split's documents,
    each row starting with BOS, no padding; int64 on `device` (CUDA when available by default). Training data
    only: the validation and test splits are the metric's, never trained on."""
    if split != "train":
        raise HarnessError(f"make_dataloader({split!r}): only the 'train' split is for training; the validation and "
                           f"test splits are the metric's, and a model trained on them reports nothing")
    return loader.make_dataloader(tokenizer, B, T, list_shards(split), device)


def validation_rows(tokenizer, T, n_rows):
    """The first n_rows packed validation rows, (n_rows, T + 1), cached once packed."""
    return loader.packed_rows(tokenizer, T, n_rows, list_shards("val"))

# ---------------------------------------------------------------------------
# The training budget: TIME_BUDGET seconds of timed steps, or STEP_BUDGET timed steps in a smoke or test run
# ---------------------------------------------------------------------------

UNTIMED_STEPS = 11   # the first steps compile and warm up: not counted in the budget (as in the reference)
_STEP_BUDGET_AT_START = STEP_BUDGET
_BUDGET = {"training_seconds": 0.0, "timed_steps": 0}   # the most the training loop reported, for the record


def training_progress(training_seconds, timed_steps):
    """The fraction of the budget used after `timed_steps` steps that took `training_seconds`, at most 1."""
    _BUDGET.update(training_seconds=round(max(_BUDGET["training_seconds"], training_seconds), 1),
                   timed_steps=max(_BUDGET["timed_steps"], timed_steps))
    if STEP_BUDGET > 0:
        return min(timed_steps / STEP_BUDGET, 1.0)
    return min(training_seconds / TIME_BUDGET, 1.0)


def budget_description():
    warm_up = f"{UNTIMED_STEPS} untimed warm-up step{'s' * (UNTIMED_STEPS != 1)}"
    if STEP_BUDGET > 0:
        return (f"{UNTIMED_STEPS + STEP_BUDGET} steps: {warm_up}, then {STEP_BUDGET} timed "
                f"(AUTORESEARCH_STEP_BUDGET: a smoke or test run, not comparable)")
    return f"{TIME_BUDGET}s of training after {warm_up}"


def budget_left(training_seconds, timed_steps):
    """What is left of the budget for the progress line: seconds, or steps where the budget is steps."""
    if STEP_BUDGET > 0:
        return f"{max(STEP_BUDGET - timed_steps, 0)} steps"
    return f"{max(0.0, TIME_BUDGET - training_seconds):.0f}s"

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

FA3_REPO_HOPPER = "varunneal/flash-attention-3"   # compute capability 9.0 (H100, H200, GH200), tried first there
FA3_REPO_OTHER = "kernels-community/flash-attn3"   # every GPU; on 9.0 when the first one has no v1 or fails
# A commit per repository (a full 40-character sha) wins over everything below. "" = not pinned here: the first run
# that loads FA3 and passes its check pins the commit its v1 branch points to then, in FA3_PIN_FILE, and every later
# run loads exactly that commit from the hub cache, with no hub request, until `uv run prepare.py --repin-attention`.
FA3_REVISIONS = {FA3_REPO_HOPPER: "", FA3_REPO_OTHER: ""}
FA3_VERSION = 1   # the kernels-hub version branch (v1) an unpinned repository resolves to
FA3_PIN_FILE = CACHE_DIR / "attention.json"   # the commit pinned at first use, per kind of GPU (docs/gpu.md)


def load_attention(device, head_dim, windows, seq_len):
    """The attention of this run, decided once: an object whose flash_attn_func(q, k, v, causal=True,
    window_size=(window, 0)) on (B, T, H, D) is FA3's; `path` and `description` name the kernel. Flash Attention 3,
    pinned, when it loads and passes a forward and backward check (also compiled) at the model's head dim and
    windows, else the slower PyTorch fallback (causal SDPA, flex_attention for sliding windows; a mask on the CPU)."""
    repos = {"hopper": FA3_REPO_HOPPER, "other": FA3_REPO_OTHER}
    chosen = choose_attention(device, head_dim, windows, seq_len, repos, FA3_REVISIONS, FA3_VERSION, FA3_PIN_FILE)
    _ATTENTION["path"] = chosen.path
    return chosen

# ---------------------------------------------------------------------------
# Evaluation (DO NOT CHANGE — this is the fixed metric)
# ---------------------------------------------------------------------------

# The harness's record of each evaluation, beside results.tsv (harness/evaluations.py), and what this run is: its
# train.py, commit and clean tree or not, taken now, at the start of the run; what the evaluation computes with, by
# identity, before any of train.py's code after its imports can change it (harness/integrity.py)
RECORDS = Path.cwd() / evaluations.RECORDS_FILE   # and beside it LAST_RUN_FILE, what the last evaluation scored
_RUN = evaluations.run_identity(getattr(sys.modules["__main__"], "__file__", None) or sys.argv[0])
_ATTENTION = {}   # the path load_attention chose
_PRISTINE = integrity.critical_identities()
_HARNESS = [attention, datasets, evaluations, gpu, integrity, loader, records, _tokenizer, tokens]
_STARTED = time.time()


def _scoring_call(model, x, vocab_size):
    """model(x) as the metric takes it: the torch it runs on untouched, plain logits of the vocabulary's columns."""
    logits = model(x)
    integrity.check_untouched(_PRISTINE, "while the model ran")
    return integrity.plain_logits(logits, x.size(0), x.size(1), vocab_size)


def _bits_per_byte(model, rows, batch_size, token_bytes, vocab_size, probe=None, probe_model=None):
    """(bits per byte of the packed rows (n, T + 1), the batch size that fit). On an out-of-memory error the batch
    is halved and the same rows scored again, so that the number never depends on the batch size. `probe`: the
    causality probe (integrity.Probe) of this evaluation, over batches of the first batch size, on `probe_model`
    (--verify: another instance, which never sees the scored rows) or the model itself."""
    import torch
    import torch.nn.functional as F
    device, n_rows = token_bytes.device, len(rows)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    done, first_size = 0, batch_size
    while done < n_rows:
        b = min(batch_size, n_rows - done)
        batch = torch.from_numpy(rows[done:done + b].astype(np.int64)).to(device)
        x, y = batch[:, :-1], batch[:, 1:]   # views with row stride T + 1, as the training loader yields
        probed = probe is not None and done % first_size == 0 and done // first_size in probe.batches
        try:
            if probed:
                k = done // first_size
                rows_, cuts = probe.plan(b)
                call = lambda: probe.keep(_scoring_call(probe_model or model, probe.perturbed(
                    batch, rows_, cuts, vocab_size)[:, :-1], vocab_size), rows_, cuts)
                probed_logits = call() if probe.first[k] else None   # before or after: the model cannot tell
            logits = _scoring_call(model, x, vocab_size)
            scored = probe.keep(logits, rows_, cuts) if probed else None
            nats_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i in range(0, b, 8):   # in chunks, so that float32 log-probs never need a second full copy
                nats = F.cross_entropy(logits[i:i + 8].float().flatten(0, 1), y[i:i + 8].flatten(), reduction="none")
                nats_sum += (nats * (token_bytes[y[i:i + 8].flatten()] > 0)).sum(dtype=torch.float64)
            del logits, nats   # before the next forward: one batch of logits alive at a time
            integrity.check_untouched(_PRISTINE, "while the loss was computed")
            if probed:
                integrity.Probe.compare(scored, probed_logits if probe.first[k] else call(), cuts)
                del scored, probed_logits
        except Exception as e:
            if batch_size == 1 or not is_out_of_memory(e):
                raise
            logits = nats = scored = probed_logits = None   # free the failed attempt before the smaller one
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"evaluation: a batch of {batch_size} runs out of GPU memory: scoring with {batch_size // 2}")
            batch_size //= 2
            continue
        total_nats += nats_sum
        total_bytes += token_bytes[y.flatten()].sum(dtype=torch.int64)
        done += b
    return total_nats.item() / (math.log(2) * total_bytes.item()), batch_size


def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte on the validation shard: the same EVAL_TOKENS // MAX_SEQ_LEN rows for any batch size.
    The model gets inputs only and returns logits (B, T, V); the loss is computed here. At most one batch
    of logits is alive at a time: each is freed before the next forward, the causality probe's included.
    Then the test split (a quarter as many rows, never trained on) is scored the same way, and both numbers go
    into the harness's record of this run (evaluations.jsonl); the test score goes nowhere else. What was scored
    is saved (last_run.pt) for `uv run prepare.py --verify`, which scores it again in a fresh process."""
    import torch
    integrity.check_harness_code([sys.modules[__name__], *_HARNESS])
    t_eval = time.time()
    with torch.no_grad():
        T, n_rows = MAX_SEQ_LEN, EVAL_TOKENS // MAX_SEQ_LEN
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        own = Tokenizer.from_directory()   # the harness's own: a tokenizer handed in could be a rigged copy
        token_bytes = get_token_bytes(device)
        anchors = integrity.check_anchors(DATA_DIR.parent / "anchors.json", [
            TOKENIZER_DIR / "tokenizer.json", TOKENIZER_DIR / "token_bytes.npy", *list_shards("val")])
        if own.get_vocab_size() != tokenizer.get_vocab_size():
            raise HarnessError(f"the tokenizer handed to evaluate_bpb has {tokenizer.get_vocab_size()} tokens, the "
                               f"cache's {own.get_vocab_size()}: use prepare.Tokenizer.from_directory()")
        rows = validation_rows(own, T, n_rows)
        probe = integrity.Probe(-(-n_rows // batch_size), T)
        val_bpb, batch_size = _bits_per_byte(model, rows, batch_size, token_bytes, own.get_vocab_size(), probe)
        test_bpb, no_test = None, None
        try:
            rows = loader.packed_rows(own, T, max(1, n_rows // 4), list_shards("test"))
        except HarnessError as e:   # a cache prepared before there was a test split
            no_test = str(e.code)
        else:
            test_bpb, batch_size = _bits_per_byte(model, rows, batch_size, token_bytes, own.get_vocab_size())
    budget = dict(_BUDGET, wall_seconds=round(t_eval - _STARTED, 1), STEP_BUDGET=STEP_BUDGET,
                  UNTIMED_STEPS=UNTIMED_STEPS, frozen=dict(STEP_BUDGET=_STEP_BUDGET_AT_START))
    constants = dict(MAX_SEQ_LEN=MAX_SEQ_LEN, EVAL_TOKENS=EVAL_TOKENS, VOCAB_SIZE=VOCAB_SIZE, TIME_BUDGET=TIME_BUDGET)
    record = evaluations.write(RECORDS, __file__, _RUN, constants, budget, seed=int(os.environ.get("SEED", 42)),
                               val_bpb=val_bpb, test_bpb=test_bpb, no_test_split=no_test, eval_batch_size=batch_size,
                               dataset=DATASET, attention=_ATTENTION.get("path"), anchors=anchors, device=device)
    evaluations.save_last_run(RECORDS.with_name(evaluations.LAST_RUN_FILE), model, record)
    return val_bpb


if __name__ == "__main__":
    from harness.cli import main   # the command line: harness/cli.py, handed this module as it is
    main(sys.modules[__name__])
