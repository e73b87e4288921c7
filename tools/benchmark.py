"""
Measure the harness on this machine: cache build, tokenizer training, loader throughput
(the fast loader against the straightforward oracle, side by side), the validation rows,
the evaluation's cost with and without the test split (side by side), and, on a GPU, one
baseline run of train.py (start-up, compile warm-up, evaluation).

    uv run tools/benchmark.py [--source ../shared/corpus] [--batches 20]

It builds a fresh cache from --source in a temporary directory, so it never touches
~/.cache/autoresearch. It prints numbers; it asserts nothing about them.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def throughput(batches, n, B, T):
    """Tokens per second over n batches, after one warm-up batch (which opens files and fills the buffer)."""
    next(batches)
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
    return n * B * T / (time.perf_counter() - t0)


def evaluation_cost(prepare, tok, T, n_rows, repeats=3):
    """evaluate_bpb as a run calls it (validation, the causality probe, the test split, the record) against the
    validation part alone, interleaved, on a small causal model: the cost of the test score, as a ratio."""
    import tempfile

    import torch
    V = tok.get_vocab_size()
    model = torch.nn.Sequential(torch.nn.Embedding(V, 64), torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, V))
    prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS = T, n_rows * T
    prepare.RECORDS = Path(tempfile.mkdtemp(prefix="autoresearch-bench-")) / "evaluations.jsonl"
    token_bytes = prepare.get_token_bytes()
    rows = prepare.validation_rows(tok, T, n_rows)
    prepare.evaluate_bpb(model, tok, 8)   # warm-up: packs and caches the test rows
    full, val_only = [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            prepare.evaluate_bpb(model, tok, 8)
            full.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            prepare._bits_per_byte(model, rows, 8, token_bytes, V, probe=True)
            val_only.append(time.perf_counter() - t0)
    full, val_only = sorted(full)[repeats // 2], sorted(val_only)[repeats // 2]
    print(f"evaluation, {n_rows} validation rows of {T} tokens (+ the probe batch) and {n_rows // 4} test rows, "
          f"{os.cpu_count()} cores:")
    print(f"  validation alone: {val_only:.3f} s, with the test split and the record: {full:.3f} s, "
          f"ratio {full / val_only:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "corpus"), help="directory of parquet shards")
    parser.add_argument("--batches", type=int, default=20, help="batches timed for the fast loader")
    parser.add_argument("--oracle-batches", type=int, default=3, help="batches timed for the oracle (slow)")
    parser.add_argument("-B", type=int, default=128)
    parser.add_argument("-T", type=int, default=2048)
    parser.add_argument("--eval-T", type=int, default=256, help="sequence length of the evaluation timing")
    parser.add_argument("--eval-rows", type=int, default=64, help="validation rows of the evaluation timing")
    args = parser.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="autoresearch-bench-"))
    try:
        run(args, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run(args, cache):
    os.environ["AUTORESEARCH_CACHE"] = str(cache)
    os.environ.pop("AUTORESEARCH_DATASET", None)   # the cache built here, whatever the user has active
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--source", args.source],
                         capture_output=True, text=True, env=os.environ)
    build = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"benchmark: prepare.py failed: {out.stderr.strip()}")
    print(f"cache build (prepare.py --source, incl. python start-up): {build:.1f} s")
    for line in out.stdout.splitlines():
        print(f"  {line}")

    import prepare
    import torch
    from tools.reference_loader import reference_batches

    tok = prepare.Tokenizer.from_directory()
    B, T = args.B, args.T
    fast = throughput(prepare.make_dataloader(tok, B, T, "train", device="cpu"), args.batches, B, T)
    oracle = throughput(reference_batches(prepare.list_shards("train"), tok, T, B), args.oracle_batches, B, T)
    print(f"loader, B={B} T={T}, {os.cpu_count()} cores:")
    print(f"  fast (prepare.make_dataloader): {fast / 1e6:8.2f} M tokens/s")
    print(f"  oracle (tools/reference_loader): {oracle / 1e6:7.2f} M tokens/s")
    print(f"  ratio: {fast / oracle:.1f}x")

    n_rows = prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN
    t0 = time.perf_counter()
    prepare.validation_rows(tok, prepare.MAX_SEQ_LEN, n_rows)
    print(f"validation rows ({n_rows} x {prepare.MAX_SEQ_LEN + 1}) from the cache: {time.perf_counter() - t0:.3f} s")
    evaluation_cost(prepare, tok, args.eval_T, args.eval_rows)
    if torch.cuda.is_available():   # one real baseline run on this cache: where its time goes
        print("GPU: running train.py on this cache (about 6 minutes)...", flush=True)
        log = subprocess.run([sys.executable, str(ROOT / "train.py")], capture_output=True, text=True,
                             env=os.environ, cwd=ROOT).stdout.splitlines()
        keys = ("device:", "attention kernel:", "budget:", "overhead:", "val_bpb:", "training_seconds:",
                "total_seconds:", "peak_vram_mb:", "mfu_percent:", "total_tokens_M:", "num_steps:")
        for line in log:
            if line.startswith(keys):
                print(f"  {line}")
    else:
        print("GPU: none here; on a GPU this also runs train.py and prints its start-up, warm-up and evaluation times")


if __name__ == "__main__":
    main()
