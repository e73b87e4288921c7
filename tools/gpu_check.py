"""
The GPU acceptance check: what this project does on a GPU, measured in one command (under 10 minutes).

    uv run tools/gpu_check.py [--source ../shared/corpus] [--no-append]

On a machine with a CUDA GPU it
  1. builds a throw-away cache from --source (`prepare.py --source`; ~/.cache is never touched),
  2. runs the smoke run (`prepare.py --smoke`) on it,
  3. runs the unmodified train.py for its full 5-minute budget on it, counting the graphs torch.compile builds,
  4. times the attention kernels alone, Flash Attention 3 against the PyTorch fallback, at the model's shapes,
and prints the figures: the summary block, the attention path, graphs compiled, steps, MFU, peak memory in
training and in evaluation, where the overhead goes, and FA3 vs fallback tokens/s. It appends them to
BENCHMARKS.md with the date, GPU, torch version and commit (--no-append: print only).
On a machine with no CUDA GPU it says so in one line and exits 1.
"""

import argparse
import collections
import datetime
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # prepare.py, for train.py run in this process and for the attention timing
from harness.formats import SUMMARY_KEYS, parse_summary, summary_line  # noqa: E402


def parse_log(text):
    """The summary block's key: value pairs and the lines train.py prints about where its time and memory go."""
    summary = parse_summary(text)
    lines = {key: next((l for l in text.splitlines() if l.startswith(key + ":")), None)
             for key in ("device", "attention kernel", "budget", "overhead", "memory", "compiled")}
    return summary, lines


def section(when, gpu, torch_version, commit, smoke, baseline, attention_rows, seconds):
    """The BENCHMARKS.md section of one check: markdown, measured figures only."""
    summary, lines = parse_log(baseline)
    smoke_summary, _ = parse_log(smoke)
    smoke_result = f"val_bpb {smoke_summary.get('val_bpb', 'none: it failed')}, " \
                   f"attention {smoke_summary.get('attention')}"
    line = lambda key: (lines[key] or f"{key}: unknown").partition(": ")[2]
    table = "\n".join(f"| {what} | {tokens} |" for what, tokens in attention_rows)
    block = "\n".join(summary_line(k, summary[k]) for k in SUMMARY_KEYS if k in summary)
    return f"""
## GPU: {gpu} ({when:%Y-%m-%d}, commit {commit})

torch {torch_version}. Data: a cache built from `shared/corpus` by `uv run tools/gpu_check.py`
({seconds:.0f} s for the whole check).

| what | value |
|---|---|
| smoke run (`prepare.py --smoke`) | {smoke_result} |
| attention path of the baseline | `{summary.get('attention', '?')}` |
| graphs compiled | {line('compiled')} |
| steps in the budget | {summary.get('num_steps', '?')} |
| MFU | {summary.get('mfu_percent', '?')} % |
| peak memory | {line('memory')} |
| overhead | {line('overhead')} |

Attention alone, forward + backward, tokens/s (bf16, compiled as in the model):

| kernel, shape | tokens/s |
|---|---|
{table}

The baseline's summary block:

```
---
{block}
```
"""


def append_benchmarks(text, path=ROOT / "BENCHMARKS.md"):
    """Append a section to BENCHMARKS.md, all at once (a failed write leaves the file as it was)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(path.read_text().rstrip("\n") + "\n" + text)
    os.replace(tmp, path)


def run_counted(train_path):
    """Run train.py in this process with torch.compile counting the graphs it builds per compiled object."""
    import torch
    from torch._inductor.compile_fx import compile_fx
    real_compile, counts = torch.compile, collections.Counter()

    def counting_compile(model=None, **kwargs):
        if "mode" in kwargs or "options" in kwargs or "backend" in kwargs:
            return real_compile(model, **kwargs)   # not countable without changing what is compiled
        name = type(model).__name__ if isinstance(model, torch.nn.Module) else getattr(model, "__name__", "?")

        def backend(graph, example_inputs):   # inductor, as backend="inductor" with no mode or options
            counts[name] += 1
            return compile_fx(graph, example_inputs)
        return real_compile(model, backend=backend, **kwargs)

    torch.compile = counting_compile
    sys.argv = [str(train_path)]
    try:
        runpy.run_path(str(train_path), run_name="__main__")
    finally:
        print("compiled: " + (", ".join(f"{name} {n} graph{'s' * (n != 1)}" for name, n in counts.items())
                              or "nothing"), flush=True)


def attention_throughput(head_dim=128, n_head=4, T=2048, B=16, windows=(1024, 2048), iters=20):
    """Forward + backward tokens/s of FA3 and of the fallback, each through torch.compile as in the model."""
    import torch
    import prepare
    from harness.attention import Attention, fetch_flash_attention_3, sliding_window_mask
    repo = prepare.FA3_REPO_HOPPER if torch.cuda.get_device_capability() == (9, 0) else prepare.FA3_REPO_OTHER
    kernel, why = fetch_flash_attention_3(repo, prepare.FA3_REVISIONS.get(repo, ""), prepare.FA3_VERSION)
    paths = [("FA3", Attention(kernel, "fa3", "") if kernel is not None else why),
             ("fallback (flex_attention + SDPA)", Attention(None, "flex+sdpa", ""))]
    rows = []
    for window in windows:
        if window < T - 1:
            sliding_window_mask(window, T, torch.device("cuda"))
        q, k, v = (torch.randn(B, T, n_head, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        for name, attention in paths:
            what = f"{name}, B={B} T={T} H={n_head} D={head_dim} window={window}"
            if isinstance(attention, str):
                rows.append((what, f"not loaded: {attention}"))
                continue
            try:
                step = torch.compile(lambda q, k, v: attention.flash_attn_func(q, k, v, causal=True,
                                                                               window_size=(window, 0)).sum())
                for _ in range(3):   # compile and warm up
                    step(q, k, v).backward()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(iters):
                    step(q, k, v).backward()
                torch.cuda.synchronize()
                rows.append((what, f"{iters * B * T / (time.perf_counter() - t0):,.0f}"))
            except Exception as e:
                rows.append((what, f"failed: {' '.join(str(e).split())[:150]}"))
    return rows


def run(cmd, env, timeout):
    """A command's combined output, echoed as it comes; (exit code, text)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        print(f"  {line}", end="", flush=True)
        out.append(line)
        if time.monotonic() > deadline:
            proc.kill()
            out.append(f"killed after {timeout} s\n")
            break
    return proc.wait(), "".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "corpus"),
                        help="directory of parquet shards to build the cache from (default ../shared/corpus)")
    parser.add_argument("--no-append", action="store_true", help="print the figures, do not append to BENCHMARKS.md")
    parser.add_argument("--run-counted", metavar="TRAIN_PY", help=argparse.SUPPRESS)   # the baseline's own process
    args = parser.parse_args(argv)
    if args.run_counted:
        return run_counted(args.run_counted)
    if not Path(args.source).is_dir():
        sys.exit(f"gpu_check: --source {args.source} is not a directory of parquet shards")
    import torch
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU found: this check measures a GPU; on the CPU run `uv run pytest` and "
                 "`uv run prepare.py --smoke`")
    t0 = time.time()
    gpu, commit = torch.cuda.get_device_name(), _commit()
    cache = Path(tempfile.mkdtemp(prefix="autoresearch-gpu-check-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}   # a real run: no step budget
    env["AUTORESEARCH_CACHE"] = str(cache)
    try:
        print(f"gpu_check: {gpu}, torch {torch.__version__}, commit {commit}; cache {cache}", flush=True)
        print("1. cache from --source", flush=True)
        code, out = run([sys.executable, "prepare.py", "--source", args.source], env, timeout=300)
        if code != 0:
            sys.exit(f"gpu_check: prepare.py --source failed (exit code {code}): see above")
        print("2. smoke run", flush=True)
        _, smoke = run([sys.executable, "prepare.py", "--smoke"], env, timeout=300)
        print("3. baseline: the unmodified train.py, full budget", flush=True)
        _, baseline = run([sys.executable, str(Path(__file__).resolve()), "--run-counted", str(ROOT / "train.py")],
                          env, timeout=600)
        print("4. attention alone: FA3 vs fallback", flush=True)
        rows = attention_throughput()
        for what, tokens in rows:
            print(f"  {what}: {tokens} tokens/s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    text = section(datetime.datetime.now(), gpu, torch.__version__, commit, smoke, baseline, rows, time.time() - t0)
    print(text)
    if not args.no_append:
        append_benchmarks(text)
        print(f"gpu_check: appended to {ROOT / 'BENCHMARKS.md'}")
    summary, _ = parse_log(baseline)
    return 0 if "val_bpb" in summary else 1


def _commit():
    out = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+uncommitted changes" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
