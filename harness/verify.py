"""
`uv run prepare.py --verify [run.log]`: the model the last evaluation saved (last_run.pt) scored again in this fresh
process, where the harness was imported before any of train.py's code could run. The constants, the tokenizer, the
token byte lengths (recomputed from the tokenizer) and the validation rows (packed again from the validation shard)
are the harness's own; the model is rebuilt from train.py's definitions above its `# Setup` line and the saved
weights. One line and exit 0 if the number holds, else one line saying what does not, exit 1.
"""

import re
import subprocess
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from harness import evaluations, integrity, loader, records
from harness.errors import HarnessError, first_line
from harness.formats import parse_summary

# The run compiled its model (on a GPU) and this process does not: bf16 rounding differs by ~1e-4 bits per byte.
# 5e-4 stays below the seed-to-seed noise of the reference's baseline (~1e-3), so a number that passes cannot hide
# a forged gain larger than the noise. On the CPU both are float32 and agree to ~1e-6.
TOLERANCE = 5e-4
SETUP = re.compile(r"^# Setup\b", re.M)


def refuse(why):
    raise HarnessError(f"--verify: {why}; do not keep this run")


def verify(prepare, log_path):
    import torch
    pristine = integrity.critical_identities()   # this process has run none of train.py's code yet
    path = prepare.RECORDS.with_name(evaluations.LAST_RUN_FILE)
    if not path.exists():
        refuse(f"no {path}: the last run saved no model (run train.py, then verify it)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    record, source = saved["record"], saved["train_py"]
    try:
        printed = parse_summary(Path(log_path).read_text(errors="replace")).get("val_bpb")
    except OSError as e:
        refuse(f"cannot read {log_path} ({e.strerror})")
    if printed is None:
        refuse(f"{log_path} has no `val_bpb:` line: the run crashed")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if record.get("commit") != head:
        refuse(f"{path} holds a run of {str(record.get('commit'))[:7]}, not of HEAD {head[:7]}: run HEAD first")
    why = evaluations.why_not_backed(record)
    if why:
        refuse(f"the run's record says {why}")

    # The metric's inputs, from the harness alone, before any of train.py's code runs here
    T, n_rows = prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN
    tokenizer = prepare.Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    token_bytes = records.checked_token_bytes(prepare.TOKENIZER_DIR)
    rows, test_rows = _rows_from_shards(prepare, tokenizer, T, n_rows)
    bits_per_byte, load_attention, Probe = prepare._bits_per_byte, prepare.load_attention, integrity.Probe

    # The model: train.py's definitions above its setup, the saved weights
    try:
        model = _rebuild(source, record, saved, load_attention)
        twin = _rebuild(source, record, saved, load_attention)   # its own definitions: no state shared with `model`
        device = next(model.parameters()).device
        token_bytes = torch.from_numpy(token_bytes).to(device)
        autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
            nullcontext()
        batch = record.get("eval_batch_size") or 1
        with torch.no_grad(), autocast:
            val_bpb, batch = bits_per_byte(model, rows, batch, token_bytes, vocab_size,
                                           Probe(-(-n_rows // batch), T), probe_model=twin)
            test_bpb = bits_per_byte(model, test_rows, batch, token_bytes, vocab_size)[0] \
                if test_rows is not None else None
        integrity.check_untouched(pristine, "while train.py's definitions and model ran")
        integrity.check_harness_code([prepare, evaluations, integrity, loader])
    except HarnessError as e:
        if str(e.code).startswith("prepare.py: --verify: "):   # refused already, in verify's own words
            raise
        refuse(str(e.code).removeprefix("prepare.py: "))
    for what, number in (("printed", float(printed)), ("recorded", record["val_bpb"])):
        if not abs(val_bpb - number) <= TOLERANCE:
            refuse(f"the saved model scores {val_bpb:.6f} here, the run {what} {number:.6f} (tolerance {TOLERANCE})")
    evaluations.append(prepare.RECORDS, dict(
        {k: record.get(k) for k in ("commit", "dirty", "train_py", "train_sha256", "seed", "dataset", "attention",
                                    "constants", "frozen_constants", "constants_frozen", "budget", "own_budget")},
        verified=True, val_bpb=val_bpb, printed=float(printed), run_val_bpb=record["val_bpb"], run_time=record["time"],
        test_bpb=test_bpb, smoke=False, gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=str(torch.__version__)))
    print(f"verified: {head[:7]} scores {val_bpb:.6f} in a fresh process, the run printed {float(printed):.6f} "
          f"(tolerance {TOLERANCE})")
    return 0


def _rows_from_shards(prepare, tokenizer, T, n_rows):
    """The validation and test rows packed again from their shards (never the token cache), and the validation
    rows the cache holds checked against them."""
    fresh = type(tokenizer)(tokenizer.enc, id=None)   # no id: no token cache, no cached rows
    rows = loader.packed_rows(fresh, T, n_rows, prepare.list_shards("val"))
    if not np.array_equal(rows, prepare.validation_rows(tokenizer, T, n_rows)):
        refuse("the validation rows in the cache differ from the validation shard's: run `uv run prepare.py`")
    try:
        test = loader.packed_rows(fresh, T, max(1, n_rows // 4), prepare.list_shards("test"))
    except HarnessError:
        test = None
    return rows, test


def _rebuild(source, record, saved, load_attention):
    """GPT(GPTConfig(**config)) from train.py's definitions above its `# Setup` line, with the saved weights."""
    import torch
    mark = SETUP.search(source or "")
    if mark is None:
        refuse("train.py has no `# Setup` line: keep it, the model is rebuilt from the definitions above it")
    namespace = {"__name__": "train_definitions", "__file__": record["train_py"]}
    try:
        exec(compile(source[:mark.start()], record["train_py"], "exec"), namespace)
        config = namespace["GPTConfig"](**saved["config"])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        windows = namespace["window_sizes"](config) if callable(namespace.get("window_sizes")) else [config.sequence_len]
        namespace["fa3"] = load_attention(device, config.n_embd // config.n_head, windows, config.sequence_len)
        with torch.device("meta"):
            model = namespace["GPT"](config)
        model.to_empty(device=device)
        if hasattr(model, "init_weights"):
            model.init_weights()   # buffers that are not saved (rotary tables), before the weights
        model.load_state_dict(saved["weights"])
    except (KeyError, TypeError, RuntimeError, AttributeError) as e:
        refuse(f"cannot rebuild the model from train.py's GPTConfig and GPT above `# Setup` and the saved weights "
               f"({first_line(e)[:200]})")
    return model.eval()
