"""tools/gpu_check.py: its refusal without a GPU, its arguments and the BENCHMARKS.md section it appends (on the
CPU); the graphs it counts (on a GPU)."""

import datetime
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402
import pytest  # noqa: E402
from conftest import one_line  # noqa: E402

BASELINE_LOG = """\
device: cuda (NVIDIA H100 80GB HBM3, 989.5 TFLOP/s bf16 peak), bf16 autocast, torch.compile
attention kernel: Flash Attention 3, varunneal/flash-attention-3@0123456789abcdef0123456789abcdef01234567 (pinned)
budget: 300s of training after 11 untimed warm-up steps | 2 micro-steps of 128 x 2048 tokens per step
step 00952 (100.0%) | loss: 2.901 | lrm: 0.00 | dt: 315ms | tok/sec: 1,664,000 | mfu: 40.2% | epoch: 1 | remaining: 0s
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
attention:        fa3:varunneal/flash-attention-3@0123456789ab
compiled: GPT 2 graphs, adamw_step 3 graphs, muon_step 4 graphs
"""

SMOKE_LOG = "smoke: train.py at toy size\n---\nval_bpb:          3.590590\nattention:        flex+sdpa\n"


def env_without_gpu():
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--source", str(tmp_path)],
                          env=env_without_gpu(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert one_line(proc.stderr) == ("gpu_check: no CUDA GPU found: this check measures a GPU; on the CPU "
                                     "run `uv run pytest` and `uv run prepare.py --smoke`")
    assert not proc.stdout


def test_a_missing_source_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--source", str(tmp_path / "no")],
                          env=env_without_gpu(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert one_line(proc.stderr) == f"gpu_check: --source {tmp_path / 'no'} is not a directory of parquet shards"


def test_parse_log_reads_the_summary_block_and_the_overhead_lines():
    summary, lines = gpu_check.parse_log(BASELINE_LOG)
    assert list(summary) == list(gpu_check.SUMMARY_KEYS)
    assert summary["num_steps"] == "953" and summary["attention"] == "fa3:varunneal/flash-attention-3@0123456789ab"
    assert lines["memory"] == "memory: peak 45060.2 MB in training, 13021.7 MB in evaluation"
    assert lines["compiled"].startswith("compiled: GPT 2 graphs")
    assert gpu_check.parse_log("Traceback (most recent call last):\n  oops\n") == (
        {}, dict.fromkeys(["device", "attention kernel", "budget", "overhead", "memory", "compiled"]))


def test_section_is_appended_to_benchmarks_md(tmp_path):
    bench = tmp_path / "BENCHMARKS.md"
    before = (ROOT / "BENCHMARKS.md").read_text()
    bench.write_text(before)
    rows = [("FA3, B=16 T=2048 H=4 D=128 window=1024", "12,000,000"),
            ("fallback (flex_attention + SDPA), B=16 T=2048 H=4 D=128 window=1024", "7,000,000")]
    text = gpu_check.section(datetime.datetime(2026, 12, 1), "NVIDIA H100 80GB HBM3", "2.9.1+cu128", "abc1234",
                             SMOKE_LOG, BASELINE_LOG, rows, 512.0)
    gpu_check.append_benchmarks(text, bench)
    after = bench.read_text()
    assert after.startswith(before.rstrip("\n")) and after.endswith(text)
    assert "## GPU: NVIDIA H100 80GB HBM3 (2026-12-01, commit abc1234)" in text and "torch 2.9.1+cu128" in text
    for figure in ("| steps in the budget | 953 |", "| MFU | 39.80 % |", "| graphs compiled | GPT 2 graphs,",
                   "| peak memory | peak 45060.2 MB in training, 13021.7 MB in evaluation |",
                   "| overhead | 14.2s start-up, 21.5s in the 11 untimed warm-up steps, 9.8s evaluation |",
                   "| attention path of the baseline | `fa3:varunneal/flash-attention-3@0123456789ab` |",
                   "val_bpb 3.590590, attention flex+sdpa", "| FA3, B=16 T=2048 H=4 D=128 window=1024 | 12,000,000 |",
                   "val_bpb:          0.997900\n"):
        assert figure in text, figure
    assert not list(tmp_path.glob(".*.tmp"))


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
