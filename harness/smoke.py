"""
The smoke run: the current train.py (with the agent's edits) at toy size through the real harness, for a few
steps, to its summary block: on the GPU if there is one, else on the CPU. `uv run prepare.py --smoke`.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.errors import HarnessError
from harness.evaluations import SMOKE_OF

SMOKE_SEQ_LEN = 128                      # MAX_SEQ_LEN of a smoke run
SMOKE_EVAL_TOKENS = 16 * SMOKE_SEQ_LEN   # EVAL_TOKENS of a smoke run: 16 validation rows
SMOKE_STEPS = 3                          # timed steps (AUTORESEARCH_STEP_BUDGET), after SMOKE_UNTIMED_STEPS
SMOKE_UNTIMED_STEPS = 1                  # UNTIMED_STEPS of a smoke run: its timing is not comparable anyway
SMOKE_SIZE = dict(DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=64, DEVICE_BATCH_SIZE=4,   # train.py's lines replaced
                  TOTAL_BATCH_SIZE=2 * 4 * SMOKE_SEQ_LEN)                       # 2 micro-steps per step


def smoke_script(src, seq_len=SMOKE_SEQ_LEN, eval_tokens=SMOKE_EVAL_TOKENS, **edits):
    """
    train.py's source at toy size: each line `NAME = ...` of SMOKE_SIZE (and of `edits`, which must exist)
    replaced, and the harness's sequence length, evaluation size and warm-up steps shrunk in that process only.
    """
    for name, value in {**SMOKE_SIZE, **edits}.items():
        src, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", src, flags=re.M)
        if n != 1 and name in edits:
            raise HarnessError(f"train.py has no single line `{name} = ...` to set")
    shrink = (f"import prepare  # smoke run: the harness's constants shrunk in this process only\n"
              f"prepare.MAX_SEQ_LEN = MAX_SEQ_LEN = {seq_len}\nprepare.EVAL_TOKENS = {eval_tokens}\n"
              f"prepare.UNTIMED_STEPS = UNTIMED_STEPS = {SMOKE_UNTIMED_STEPS}\n")
    src, n = re.subn(r"^from prepare import (\([^)]*\)|.*)$", lambda m: m.group(0) + "\n" + shrink, src,
                     count=1, flags=re.M)
    if n != 1:
        raise HarnessError("train.py has no line `from prepare import ...`: it must take the harness from prepare.py")
    return src


def run_smoke(train_path, dataset, steps=SMOKE_STEPS):
    """Run a toy-size copy of train.py (the current one, with the agent's edits) to its summary block; its exit code."""
    train_path = Path(train_path)
    size = ", ".join(f"{k}={v}" for k, v in SMOKE_SIZE.items())
    print(f"smoke: {train_path} at toy size ({size}, MAX_SEQ_LEN={SMOKE_SEQ_LEN}), {SMOKE_UNTIMED_STEPS + steps} "
          f"steps, on the GPU if there is one; data: {dataset}", flush=True)
    root = str(Path(__file__).resolve().parent.parent)   # the repo: the copy imports this prepare.py and harness
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "AUTORESEARCH_STEP_BUDGET": str(steps), "PYTHONPATH": pythonpath,
           SMOKE_OF: str(train_path.resolve())}   # its record: a smoke run of this train.py, never a night's number
    with tempfile.TemporaryDirectory(prefix="autoresearch-smoke-") as tmp:
        script = Path(tmp) / "train.py"
        script.write_text(smoke_script(train_path.read_text()))
        code = subprocess.run([sys.executable, str(script)], cwd=train_path.parent, env=env).returncode
    if code != 0:
        raise HarnessError(f"the smoke run of {train_path} failed (exit code {code}): the lines above say why")
    return 0
