"""tools/gpu_check.py on the CPU, everything but the GPU itself: its refusal without one, its arguments, the
BENCHMARKS.md section from a fake run's output, its deadline over a silent child, a machine without kernels, and
the whole check end to end with a fake GPU and a fake train.py; the graphs it counts (on a GPU)."""

import datetime
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402
import pytest  # noqa: E402
from conftest import one_line  # noqa: E402

ATTENTION_LINE = ("attention kernel: PyTorch fallback, flex_attention (sliding windows) + causal SDPA, slower than "
                  "FA3; Flash Attention 3 unavailable: the kernels package is not installed (ModuleNotFoundError: "
                  "No module named 'kernels')")
BASELINE_LOG = f"""\
device: cuda (NVIDIA H100 80GB HBM3, 989.5 TFLOP/s bf16 peak), bf16 autocast, torch.compile
{ATTENTION_LINE}
DEVICE_BATCH_SIZE = 128 runs out of GPU memory: using 64 (set it in train.py to skip this search)
V1202 03:14:35.380000 2168 torch/_dynamo/guards.py:4181] [0/1] [__recompiles] Recompiling function forward in /w/train.py:88
V1202 03:14:35.380000 2168 torch/_dynamo/guards.py:4181] [0/1] [__recompiles]     triggered by the following guard failure(s):
V1202 03:14:35.380000 2168 torch/_dynamo/guards.py:4181] [0/1] [__recompiles]     - 0/0: tensor 'idx' size mismatch at index 0. expected 64, actual 8
budget: 300s of training after 11 untimed warm-up steps | 4 micro-steps of 64 x 2048 tokens per step
step 00952 (100.0%) | loss: 2.901 | lrm: 0.00 | dt: 315ms | tok/sec: 1,664,000 | mfu: 40.2% | epoch: 1 | remaining: 0s
evaluation: a batch of 128 runs out of GPU memory: scoring with 64
overhead: 14.2s start-up, 21.5s in the 11 untimed warm-up steps, 9.8s evaluation
memory: peak 45060.2 MB in training, 13021.7 MB in evaluation
---
val_bpb:          0.997900
training_seconds: 300.1
total_seconds:    345.9
peak_vram_mb:     45060.2
mfu_percent:      39.80
total_tokens_M:   499.6
num_steps:        953
num_params_M:     50.3
depth:            8
dataset:          karpathy/climbmix-400b-shuffle
attention:        flex+sdpa
compiled: GPT 2 graphs, adamw_step 3 graphs, muon_step 4 graphs
"""
VERSIONS = "driver 570.86.15 (CUDA 12.8), torch 2.11.0+cu128 (CUDA 12.8), kernels not installed, Python 3.12.3"
SMOKE_LOG = "smoke: train.py at toy size\n---\nval_bpb:          3.590590\nattention:        flex+sdpa\n"
ROWS = [("FA3 fa3:x@0123456789ab, B=16 T=2048 H=4 D=128 window=1024", "12,000,000"),
        ("fallback (flex_attention + SDPA), B=16 T=2048 H=4 D=128 window=1024", "7,000,000")]


def env_without_gpu():
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_without_a_gpu_it_says_so_in_one_line_within_30_s(tmp_path):
    """The venv's python, no uv: the same one line a GPU machine's own python would give without a GPU."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cache", str(tmp_path)],
                          env=env_without_gpu(), capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 1
    assert one_line(proc.stderr) == ("gpu_check: no CUDA GPU found: this check measures a GPU; on the CPU "
                                     "run `uv run pytest` and `uv run prepare.py --smoke`")
    assert not proc.stdout


@pytest.mark.parametrize("flag, message", [
    ("--source", "gpu_check: --source {} is not a directory of parquet shards"),
    ("--cache", "gpu_check: --cache {} is not a directory: build one with `AUTORESEARCH_CACHE=DIR uv run prepare.py "
                "--source ../shared/corpus`")])
def test_a_missing_source_or_cache_is_one_line(tmp_path, flag, message):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), flag, str(tmp_path / "no")],
                          env=env_without_gpu(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert one_line(proc.stderr) == message.format(tmp_path / "no")


def test_parse_log_reads_the_summary_block_and_the_lines_about_the_run():
    summary, lines = gpu_check.parse_log(BASELINE_LOG)
    assert list(summary) == list(gpu_check.SUMMARY_KEYS)
    assert summary["num_steps"] == "953" and summary["attention"] == "flex+sdpa"
    assert lines["memory"] == "memory: peak 45060.2 MB in training, 13021.7 MB in evaluation"
    assert lines["compiled"].startswith("compiled: GPT 2 graphs") and lines["attention kernel"] == ATTENTION_LINE
    assert gpu_check.batch_lines(BASELINE_LOG) == [BASELINE_LOG.splitlines()[i] for i in (2, 6, 8)]
    assert gpu_check.recompiles(BASELINE_LOG) == [
        "Recompiling function forward in /w/train.py:88",
        "- 0/0: tensor 'idx' size mismatch at index 0. expected 64, actual 8"]
    assert gpu_check.parse_log("Traceback (most recent call last):\n  oops\n") == (
        {}, dict.fromkeys(["device", "attention kernel", "budget", "overhead", "memory", "compiled"]))


def test_section_holds_every_figure_beside_the_reference(tmp_path):
    bench = tmp_path / "BENCHMARKS.md"
    before = (ROOT / "BENCHMARKS.md").read_text()
    bench.write_text(before)
    text = gpu_check.section(datetime.datetime(2026, 12, 1), "NVIDIA H100 80GB HBM3", VERSIONS, "abc1234",
                             BASELINE_LOG, ROWS, SMOKE_LOG, 512.0, "the cache given, /c")
    gpu_check.append_benchmarks(text, bench)
    after = bench.read_text()
    assert after.startswith(before.rstrip("\n")) and after.endswith(text)
    for figure in (
            "## GPU: NVIDIA H100 80GB HBM3 (2026-12-01, commit abc1234)", VERSIONS + ". Data: the cache given, /c (512 s",
            "Attention kernel: " + ATTENTION_LINE.partition(": ")[2],
            "FA3 unavailable because: the kernels package is not installed (ModuleNotFoundError: No module named "
            "'kernels')",
            "| steps in the budget | 953 | 953 |", "| MFU | 39.80 % | 39.8 % |",
            "| peak memory (peak_vram_mb) | 45.1 GB | 45.1 GB |", "| overhead (total - training seconds) | 46 s | 26 s |",
            "| val_bpb | 0.997900 | 0.9979 |", "| MFU against | 989.5 TFLOP/s bf16 peak |",
            "| batch fitting | DEVICE_BATCH_SIZE = 128 runs out of GPU memory: using 64 (set it in train.py to skip this "
            "search)<br>budget: 300s", "<br>evaluation: a batch of 128 runs out of GPU memory: scoring with 64 |",
            "| graphs compiled | GPT 2 graphs, adamw_step 3 graphs, muon_step 4 graphs |", "| recompiles | 1 |",
            "- `Recompiling function forward in /w/train.py:88`", "- `- 0/0: tensor 'idx' size mismatch",
            "| peak memory | peak 45060.2 MB in training, 13021.7 MB in evaluation |",
            "| overhead | 14.2s start-up, 21.5s in the 11 untimed warm-up steps, 9.8s evaluation |",
            "| smoke run (`prepare.py --smoke`) | val_bpb 3.590590, attention flex+sdpa |",
            f"| {ROWS[0][0]} | 12,000,000 |", "The baseline's summary block:", "val_bpb:          0.997900\n"):
        assert figure in text, figure
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_baseline_leaves_its_last_30_lines():
    log = "device: cuda (NVIDIA L4, 121.0 TFLOP/s bf16 peak), bf16 autocast, torch.compile\n" + \
          "".join(f"line {i}\n" for i in range(50)) + "killed at the deadline, after 486 s\n"
    text = gpu_check.section(datetime.datetime(2026, 12, 1), "NVIDIA L4", VERSIONS, "abc1234", log, [], "", 540.0, "x")
    assert "The baseline failed; its last 30 lines:\n\n```\nline 21\n" in text
    assert text.rstrip().endswith("line 49\nkilled at the deadline, after 486 s\n```")
    assert "| steps in the budget | ? | 953 |" in text and "Attention kernel: none printed" in text
    assert "FA3 unavailable because: unknown: the run printed no attention kernel line" in text


def test_a_silent_child_is_killed_with_its_process_group_at_the_deadline():
    """Nothing printed, a grandchild holding the pipe: the deadline holds all the same, and nothing survives."""
    script = "import subprocess, sys, time; p = subprocess.Popen(['sleep', '300']); print(p.pid, flush=True); " \
             "time.sleep(300)"
    t0 = time.monotonic()
    code, text = gpu_check.run([sys.executable, "-c", script], dict(os.environ), time.monotonic() + 3)
    assert time.monotonic() - t0 < 15
    assert code is None and text.splitlines()[-1].startswith("killed at the deadline, after ")
    grandchild = int(text.splitlines()[0])
    status = Path(f"/proc/{grandchild}/status")
    time.sleep(0.5)
    assert not status.exists() or "\nState:\tZ" in status.read_text()   # gone, or a zombie no one reaped yet


def test_without_kernels_the_versions_say_not_installed():
    code = ("import sys; sys.modules['kernels'] = None; sys.path.insert(0, 'tools'); import gpu_check; "
            "print(gpu_check.versions())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ", kernels not installed, Python " in proc.stdout and proc.stdout.startswith("driver ")


def fake_gpu_check(tmp_path, monkeypatch, train_source, deadline):
    """gpu_check.main in this process with a fake GPU and a fake train.py: (exit code, what it printed)."""
    train = tmp_path / "train.py"
    train.write_text(textwrap.dedent(train_source))
    monkeypatch.setattr(gpu_check, "cuda_gpu", lambda: "Fake GPU")
    monkeypatch.setattr(gpu_check, "TRAIN", train)
    return gpu_check.main(["--cache", str(tmp_path), "--deadline", str(deadline), "--no-append"])


@pytest.mark.slow
def test_the_whole_check_ends_at_its_deadline_when_the_run_prints_nothing(tmp_path, monkeypatch, capsys):
    t0 = time.monotonic()
    code = fake_gpu_check(tmp_path, monkeypatch, "import time\ntime.sleep(600)\n", deadline=20)
    assert time.monotonic() - t0 < 20 + 15 and code == 1   # the deadline, and at most the grace of one kill
    out = capsys.readouterr().out
    assert re.search(r"The baseline failed; its last 30 lines:\n\n```\ncompiled: nothing\nkilled at the deadline, "
                     r"after \d+ s\n```", out)
    assert "| smoke run (`prepare.py --smoke`) | not run: too little time left before the deadline |" in out


@pytest.mark.slow
def test_the_whole_check_records_a_fake_baseline(tmp_path, monkeypatch, capsys):
    code = fake_gpu_check(tmp_path, monkeypatch, f"print({BASELINE_LOG[:BASELINE_LOG.index('compiled:')]!r})\n",
                          deadline=55)
    assert code == 0
    out = capsys.readouterr().out
    for figure in ("| steps in the budget | 953 | 953 |", "| recompiles | 1 |", "| graphs compiled | nothing |",
                   "FA3 unavailable because: the kernels package is not installed", "val_bpb:          0.997900\n"):
        assert figure in out, figure


@pytest.mark.gpu   # inductor as on the GPU check; on the CPU it costs ~12 s of the suite (its import alone ~5 s)
@pytest.mark.slow
def test_the_baseline_runs_in_process_with_its_compiled_graphs_counted(tmp_path):
    """--run-counted: the script runs as __main__, and each graph inductor builds is counted per compiled object."""
    script = tmp_path / "train.py"
    script.write_text("import torch\n\n\ndef square(x):\n    return x @ x\n\n\n"
                      "square = torch.compile(square, dynamic=False)\n"
                      "for n in (3, 3, 4):  # a new shape: a second graph\n"
                      "    square(torch.ones(n, n, device='cuda'))\n"
                      "print('ran as', __name__)\n")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}   # compiled here, not found in /tmp
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--run-counted", str(script)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["ran as __main__", "compiled: square 2 graphs"]
