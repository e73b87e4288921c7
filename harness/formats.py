"""
The formats other programs read, each defined once: the summary block that train.py prints at the end of a run
(program.md greps it; parallel.py, tools/gpu_check.py and the tests parse it) and results.tsv's header
(program.md's setup writes it; analysis.py and parallel.py read and write it).
"""

import re

# The summary block: `---`, then these keys in this order, each `key:` padded to one column. train.py prints it
# itself, top to bottom, as the agent reads it; a key is only ever added at the end.
SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "dataset", "attention")

# results.tsv, tab-separated; a parallel night's adds its own columns after these
RESULTS_HEADER = ("commit", "val_bpb", "memory_gb", "status", "description")
PARALLEL_HEADER = RESULTS_HEADER + ("gpu", "parent", "wave", "run", "started", "ended")


def summary_line(key, value):
    """One line of the summary block, as train.py prints it."""
    return f"{key + ':':<18}{value}"


def parse_summary(log):
    """The last summary block of a run's output as {key: value}, only the keys of SUMMARY_KEYS; {} if none."""
    parts = re.split(r"^---$", log, flags=re.M)
    if len(parts) < 2:
        return {}
    found = dict(re.findall(r"^(\w+):[ \t]*(.*?)[ \t]*$", parts[-1], re.M))
    return {key: found[key] for key in SUMMARY_KEYS if key in found}
