"""
Measure the harness on this machine: cache build, tokenizer training, loader throughput
(the fast loader against the straightforward oracle, side by side), the validation rows,
the evaluation's cost with and without the test split (side by side), --verify's repacking,
and, on a GPU, one baseline run of train.py (start-up, compile warm-up, evaluation).

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
    """What the test score and the evaluation's checks cost, side by side on a small causal model: the validation
    rows with the causality probe, the test rows (a quarter as many), and evaluate_bpb whole (the checks of the
    harness's code and files, both splits, the record), each the median of `repeats`, interleaved."""
    import tempfile

    import torch
    from harness import integrity, loader
    V = tok.get_vocab_size()
    model = torch.nn.Sequential(torch.nn.Embedding(V, 64), torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, V))
    prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS = T, n_rows * T
    prepare.RECORDS = Path(tempfile.mkdtemp(prefix="autoresearch-bench-")) / "evaluations.jsonl"
    token_bytes = prepare.get_token_bytes()
    rows = prepare.validation_rows(tok, T, n_rows)
    test = loader.packed_rows(tok, T, n_rows // 4, prepare.list_shards("test"))
    times = {"validation": [], "test": [], "evaluate_bpb": []}
    with torch.no_grad():
        for _ in range(repeats):
            for name, run in (("validation", lambda: prepare._bits_per_byte(
                                  model, rows, 8, token_bytes, V, integrity.Probe(-(-n_rows // 8), T))),
                              ("test", lambda: prepare._bits_per_byte(model, test, 8, token_bytes, V)),
                              ("evaluate_bpb", lambda: prepare.evaluate_bpb(model, tok, 8))):
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    val, test_s, whole = (sorted(times[k])[repeats // 2] for k in ("validation", "test", "evaluate_bpb"))
    print(f"evaluation, {n_rows} validation rows of {T} tokens (+ 4 probe batches) and {n_rows // 4} test rows, "
          f"{os.cpu_count()} cores:")
    print(f"  validation {val:.3f} s, test {test_s:.3f} s: the test score adds {test_s / val:.1%}; evaluate_bpb "
          f"whole (checks, record) {whole:.3f} s = {whole / val:.2f} x the validation alone")


def packing_cost(prepare, tok):
    """--verify packs the validation rows again from the shard (never the token cache): its cost at the real size."""
    from harness import loader
    n_rows = prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN
    fresh = type(tok)(tok.enc, id=None)
    t0 = time.perf_counter()
    loader.packed_rows(fresh, prepare.MAX_SEQ_LEN, n_rows, prepare.list_shards("val"))
    print(f"--verify's repacking of {n_rows} validation rows of {prepare.MAX_SEQ_LEN + 1} tokens from the shard, "
          f"{os.cpu_count()} cores: {time.perf_counter() - t0:.1f} s")


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
    packing_cost(prepare, tok)
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
