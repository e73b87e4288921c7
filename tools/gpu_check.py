"""
The GPU acceptance check: what this project does on a GPU, measured in one command that ends within 9 minutes.

    uv run tools/gpu_check.py [--source ../shared/corpus] [--no-append]
    python3 tools/gpu_check.py --cache DIR     # any python with torch: no uv, kernels, rustbpe or network needed

--cache DIR: a cache built elsewhere, `AUTORESEARCH_CACHE=DIR uv run prepare.py --source ../shared/corpus` (a few
tens of MB), so that this machine needs no rustbpe. On a machine with a CUDA GPU it
  1. builds a throw-away cache from --source (`prepare.py --source`), unless --cache DIR is given,
  2. runs the unmodified train.py for its full 5-minute budget, counting the graphs torch.compile builds and
     logging why it recompiles (TORCH_LOGS=recompiles),
  3. times the attention kernels alone, the run's kernel (FA3 when it loaded) against the PyTorch fallback,
  4. runs the smoke run (`prepare.py --smoke`) if time is left,
each in a child process whose whole process group is killed at the deadline, output or not; then it appends one
section to BENCHMARKS.md (--no-append: print only): versions (driver, CUDA, torch, kernels), the attention kernel
line and why FA3 was unavailable, the batch-fitting lines, the MFU peak used, graphs compiled and recompile
reasons, training and evaluation peaks, a failed run's last 30 lines, and a table beside the reference's H100 run.
On a machine with no CUDA GPU it says so in one line and exits 1.
"""

import argparse
import collections
import datetime
import os
import platform
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "train.py"
sys.path.insert(0, str(ROOT))   # prepare.py, for train.py run in this process and for the attention timing
from harness.formats import SUMMARY_KEYS, parse_summary, summary_line  # noqa: E402

DEADLINE = 540   # seconds: the check ends within 9 minutes, whatever its children do
# The reference's own baseline on one H100 (SPEC.md, section 5): overhead = total_seconds - training_seconds
REFERENCE = dict(num_steps="953", mfu_percent="39.8 %", peak="45.1 GB", overhead="26 s", val_bpb="0.9979")
LINES = ("device", "attention kernel", "budget", "overhead", "memory", "compiled")


def parse_log(text):
    """The summary block's key: value pairs and the lines train.py prints about where its time and memory go."""
    summary = parse_summary(text)
    lines = {key: next((l for l in text.splitlines() if l.startswith(key + ":")), None) for key in LINES}
    return summary, lines


def batch_lines(text):
    """What fitting the batch to the GPU printed: each halving, in training and in evaluation, and the budget line."""
    return [l for l in text.splitlines() if l.startswith(("DEVICE_BATCH_SIZE = ", "evaluation: a batch of", "budget:"))]


def recompiles(text):
    """TORCH_LOGS=recompiles: each recompiled function and the guard that failed, the log prefixes removed."""
    found = [l.partition("[__recompiles]")[2].strip() for l in text.splitlines() if "[__recompiles]" in l]
    return [l for l in found if l and not l.startswith("triggered by")]


def this_run(summary):
    """The figures the reference's table holds, as this run printed them ('?' where it printed none)."""
    get = lambda key: summary.get(key, "?")
    try:
        overhead = f"{float(summary['total_seconds']) - float(summary['training_seconds']):.0f} s"
    except (KeyError, ValueError):
        overhead = "?"
    try:
        peak = f"{float(summary['peak_vram_mb']) / 1000:.1f} GB"
    except (KeyError, ValueError):
        peak = "?"
    mfu = get("mfu_percent")
    return dict(num_steps=get("num_steps"), mfu_percent=f"{mfu} %" if re.fullmatch(r"[\d.]+", mfu) else mfu,
                peak=peak, overhead=overhead, val_bpb=get("val_bpb"))


def section(when, gpu, versions, commit, baseline, attention_rows, smoke, seconds, data):
    """The BENCHMARKS.md section of one check: markdown, measured figures only."""
    summary, lines = parse_log(baseline)
    line = lambda key: (lines[key] or f"{key}: none printed").partition(": ")[2]
    kernel = line("attention kernel")
    why = kernel.partition("Flash Attention 3 unavailable: ")[2] or "none: FA3 ran" if lines["attention kernel"] \
        else "unknown: the run printed no attention kernel line"
    peak_used = re.search(r"\(.*?, (.*?)\)", lines["device"] or "")
    ours = this_run(summary)
    table = "\n".join(f"| {what} | {ours[key]} | {REFERENCE[key]} |" for key, what in (
        ("num_steps", "steps in the budget"), ("mfu_percent", "MFU"), ("peak", "peak memory (peak_vram_mb)"),
        ("overhead", "overhead (total - training seconds)"), ("val_bpb", "val_bpb")))
    fitted = "<br>".join(batch_lines(baseline)) or "none printed"
    reasons = recompiles(baseline)
    recompiled = "\n".join(f"- `{r}`" for r in reasons) or "- none"
    timing = "\n".join(f"| {what} | {tokens} |" for what, tokens in attention_rows) or "| not measured | |"
    smoke_summary, _ = parse_log(smoke)
    smoke_result = f"val_bpb {smoke_summary['val_bpb']}, attention {smoke_summary.get('attention')}" \
        if "val_bpb" in smoke_summary else (smoke.strip().splitlines() or ["no output"])[-1]
    if "val_bpb" in summary:
        outcome = "The baseline's summary block:\n\n```\n---\n" + "\n".join(
            summary_line(k, summary[k]) for k in SUMMARY_KEYS if k in summary) + "\n```"
    else:
        outcome = "The baseline failed; its last 30 lines:\n\n```\n" + "\n".join(baseline.splitlines()[-30:]) + "\n```"
    return f"""
## GPU: {gpu} ({when:%Y-%m-%d}, commit {commit})

{versions}. Data: {data} ({seconds:.0f} s for the whole check).

Attention kernel: {kernel}

FA3 unavailable because: {why}

| figure | this GPU | reference (H100) |
|---|---|---|
{table}

| what | value |
|---|---|
| MFU against | {peak_used[1] if peak_used else line('device')} |
| batch fitting | {fitted} |
| graphs compiled | {line('compiled')} |
| recompiles | {len([r for r in reasons if r.startswith('Recompiling')])} |
| peak memory | {line('memory')} |
| overhead | {line('overhead')} |
| smoke run (`prepare.py --smoke`) | {smoke_result} |

Recompile reasons:

{recompiled}

Attention alone, forward + backward, tokens/s (bf16, compiled as in the model):

| kernel, shape | tokens/s |
|---|---|
{timing}

{outcome}
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
    try:
        from torch._inductor.compile_fx import compile_fx
    except ImportError as e:   # another torch than the locked one may have moved it: run uncounted
        print(f"compiled: not counted ({e})", flush=True)
        return runpy.run_path(str(train_path), run_name="__main__")
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
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # killed at the deadline: still say what it compiled
    sys.argv = [str(train_path)]
    try:
        runpy.run_path(str(train_path), run_name="__main__")
    finally:
        print("compiled: " + (", ".join(f"{name} {n} graph{'s' * (n != 1)}" for name, n in counts.items())
                              or "nothing"), flush=True)


def time_attention(head_dim=128, n_head=4, T=2048, B=16, windows=(1024, 2048), iters=20):
    """Forward + backward tokens/s of the run's kernel (as prepare.load_attention chooses it: the baseline's pin)
    and of the fallback, each through torch.compile as in the model; one `attention: what | tokens/s` line each."""
    import torch
    import prepare
    from harness.attention import Attention, sliding_window_mask
    chosen = prepare.load_attention(torch.device("cuda"), head_dim, list(windows), T)
    paths = [("fallback (flex_attention + SDPA)", Attention(None, "flex+sdpa", ""))]
    if chosen.kernel is not None:
        paths.insert(0, (f"FA3 {chosen.path}", chosen))
    else:
        print(f"attention: FA3 | not loaded: {chosen.description.partition('unavailable: ')[2]}", flush=True)
    for window in windows:
        if window < T - 1:
            sliding_window_mask(window, T, torch.device("cuda"))
        q, k, v = (torch.randn(B, T, n_head, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        for name, attention in paths:
            what = f"{name}, B={B} T={T} H={n_head} D={head_dim} window={window}"
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
                print(f"attention: {what} | {iters * B * T / (time.perf_counter() - t0):,.0f}", flush=True)
            except Exception as e:
                print(f"attention: {what} | failed: {' '.join(str(e).split())[:150]}", flush=True)


def attention_rows(text):
    return [tuple(l[len("attention: "):].split(" | ", 1)) for l in text.splitlines()
            if l.startswith("attention: ") and " | " in l]


def run(cmd, env, until):
    """A child's combined output, echoed as it comes: (exit code, text). At the monotonic time `until` its whole
    process group is killed, whether it prints or not, and the text says so."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)   # its own group: compile workers go too
    out = []

    def read():
        for line in proc.stdout:
            print(f"  {line}", end="", flush=True)
            out.append(line)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = None
    try:
        code = proc.wait(timeout=max(0.0, until - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:   # the deadline, or this check interrupted: never leave a child behind
            _kill_group(proc)
    reader.join(timeout=5)
    text = "".join(out)
    if code is None:
        text += f"{'' if text.endswith(chr(10)) or not text else chr(10)}killed at the deadline, after " \
                f"{time.monotonic() - t0:.0f} s\n"
    return code, text


def _kill_group(proc):
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def versions():
    """Driver, CUDA, torch, kernels and Python versions, one line; 'unknown' or 'not installed' where missing."""
    import torch
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        smi = ""
    driver = re.search(r"Driver Version:\s*(\S+)", smi)
    cuda = re.search(r"CUDA Version:\s*(\S+)", smi)
    try:
        import kernels  # noqa: F401 (present or not is the question)
        from importlib.metadata import version
        kernels_version = version("kernels")
    except ImportError:
        kernels_version = "not installed"
    return (f"driver {driver[1] if driver else 'unknown'} (CUDA {cuda[1] if cuda else 'unknown'}), torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}), kernels {kernels_version}, Python "
            f"{platform.python_version()}")


def cuda_gpu():
    """The CUDA GPU's name, or None."""
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "corpus"),
                        help="directory of parquet shards to build the cache from (default ../shared/corpus)")
    parser.add_argument("--cache", metavar="DIR", help="use this prepared cache (AUTORESEARCH_CACHE of a "
                        "`prepare.py --source` run elsewhere) instead of building one: no rustbpe needed")
    parser.add_argument("--no-append", action="store_true", help="print the figures, do not append to BENCHMARKS.md")
    parser.add_argument("--deadline", type=float, default=DEADLINE, metavar="SECONDS",
                        help=f"end everything after this many seconds (default {DEADLINE})")
    parser.add_argument("--run-counted", metavar="TRAIN_PY", help=argparse.SUPPRESS)   # the baseline's own process
    parser.add_argument("--time-attention", action="store_true", help=argparse.SUPPRESS)   # step 3's process
    args = parser.parse_args(argv)
    if args.run_counted:
        return run_counted(args.run_counted)
    if args.time_attention:
        return time_attention()
    if args.cache and not Path(args.cache).is_dir():
        sys.exit(f"gpu_check: --cache {args.cache} is not a directory: build one with `AUTORESEARCH_CACHE=DIR uv run "
                 f"prepare.py --source ../shared/corpus`")
    if not args.cache and not Path(args.source).is_dir():
        sys.exit(f"gpu_check: --source {args.source} is not a directory of parquet shards")
    gpu = cuda_gpu()
    if gpu is None:
        sys.exit("gpu_check: no CUDA GPU found: this check measures a GPU; on the CPU run `uv run pytest` and "
                 "`uv run prepare.py --smoke`")
    t0 = time.monotonic()
    deadline = t0 + args.deadline
    reserve = args.deadline / 10   # after the baseline: the attention timing and this section
    commit, about = _commit(), versions()
    cache = Path(args.cache).resolve() if args.cache else Path(tempfile.mkdtemp(prefix="autoresearch-gpu-check-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}   # a real run: no step budget
    env.update(AUTORESEARCH_CACHE=str(cache), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                    env.get("PYTHONPATH")])))
    baseline = smoke = ""
    rows = []
    try:
        print(f"gpu_check: {gpu}, {about}, commit {commit}; cache {cache}; ends within {args.deadline:.0f} s",
              flush=True)
        if args.cache:
            data = f"the cache given, {args.cache}"
        else:
            data = f"a cache built from `{args.source}` by the check"
            print("1. cache from --source", flush=True)
            code, out = run([sys.executable, "prepare.py", "--source", args.source], env, deadline - 2 * reserve)
            if code != 0:
                how = "killed at the deadline" if code is None else f"exit code {code}"
                sys.exit(f"gpu_check: prepare.py --source failed ({how}): see above")
        print("2. baseline: the unmodified train.py, full budget", flush=True)
        _, baseline = run([sys.executable, str(Path(__file__).resolve()), "--run-counted", str(TRAIN)],
                          {**env, "TORCH_LOGS": "recompiles"}, deadline - reserve)
        print("3. attention alone: the run's kernel vs the fallback", flush=True)
        code, timed = run([sys.executable, str(Path(__file__).resolve()), "--time-attention"], env, deadline - 5)
        rows = attention_rows(timed)
        if code != 0:   # its last line says why: a traceback's, or the deadline
            rows.append(("attention timing", (timed.strip().splitlines() or ["no output"])[-1]))
        if deadline - time.monotonic() >= 60:
            print("4. smoke run", flush=True)
            _, smoke = run([sys.executable, "prepare.py", "--smoke"], env, deadline - 2)
        else:
            smoke = "not run: too little time left before the deadline\n"
    finally:
        if not args.cache:
            shutil.rmtree(cache, ignore_errors=True)
    text = section(datetime.datetime.now(), gpu, about, commit, baseline, rows, smoke, time.monotonic() - t0, data)
    print(text)
    if not args.no_append:
        append_benchmarks(text)
        print(f"gpu_check: appended to {ROOT / 'BENCHMARKS.md'}")
    summary, _ = parse_log(baseline)
    return 0 if "val_bpb" in summary else 1


def _commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:   # no git on this machine
        return "unknown"
    return (out.stdout.strip() or "unknown") + ("+uncommitted changes" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
