"""
What an edit of train.py could do to the metric, checked. train.py runs in the same process as the evaluation, so
everything here is a tripwire for what its code can change there (the harness's functions and files, torch's loss,
the logits' type, the causality probe); `uv run prepare.py --verify` (verify.py) then scores the saved model again
in a fresh process, where train.py's code runs only inside the model.
"""

import hashlib
import json
import secrets
import sys
import types
from pathlib import Path

import numpy as np

from harness.errors import HarnessError

# What the loss is computed with: replaced, wrapped or shadowed while a model runs, the number means nothing.
_CRITICAL = {
    "torch": ("zeros", "from_numpy", "is_tensor", "no_grad", "float64", "int64", "Tensor"),
    "torch.nn.functional": ("cross_entropy", "log_softmax", "nll_loss"),
    "torch.Tensor": ("float", "sum", "flatten", "__getitem__", "__mul__", "__gt__", "__add__", "__iadd__", "to",
                     "item", "clone", "log_softmax", "abs", "max", "__sub__", "__le__"),
    "math": ("log",),
}


def _resolve(path):
    import torch
    return torch.Tensor if path == "torch.Tensor" else sys.modules[path]


def critical_identities():
    """The objects the loss is computed with, by identity, as they are now (taken before any of train.py's code can
    run in the process: at the harness's import)."""
    return {(path, name): id(getattr(_resolve(path), name)) for path, names in _CRITICAL.items() for name in names}


def check_untouched(pristine, during):
    """Refuse in one line if any object of the loss, or the torch function and dispatch mode stacks, changed."""
    import torch
    changed = [f"{path}.{name}" for (path, name), ident in pristine.items()
               if id(getattr(_resolve(path), name)) != ident]
    if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        changed.append("a torch function or dispatch mode")
    if changed:
        raise HarnessError(f"{', '.join(changed[:3])} changed {during}: the loss is the harness's to compute, so no "
                           f"val_bpb is reported; remove that code from train.py")


def plain_logits(logits, b, T, vocab_size):
    """The logits of a scoring call, checked: a plain torch.Tensor (a subclass could rewrite the loss computed on it)
    of shape (b, T, >= vocab); only the vocabulary's columns count."""
    import torch
    if type(logits) is not torch.Tensor or logits.dim() != 3 or logits.shape[:2] != (b, T) \
            or logits.shape[2] < vocab_size:
        what = f"{type(logits).__name__} {tuple(logits.shape)}" if torch.is_tensor(logits) else type(logits).__name__
        raise HarnessError(f"model(x) must return a plain torch.Tensor of logits of shape (B, T, >= {vocab_size}), "
                           f"got {what}")
    return logits[..., :vocab_size]


def _code_matches(mine, frozen):
    """Whether a function's code object is the one compiled from the frozen source (constants and nested code too)."""
    if mine.co_code != frozen.co_code or mine.co_names != frozen.co_names or len(mine.co_consts) != len(frozen.co_consts):
        return False
    return all(_code_matches(a, b) if isinstance(a, types.CodeType) else
               not isinstance(b, types.CodeType) and (a == b or a != a and b != b)
               for a, b in zip(mine.co_consts, frozen.co_consts))


def _frozen_functions(path):
    """Top-level functions and methods of classes in a source file, compiled afresh: {qualified name: code}."""
    code = compile(Path(path).read_text(), str(path), "exec")
    found = {}

    def walk(code, prefix):
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                name = f"{prefix}{const.co_name}"
                found[name] = const
                if const.co_name[:1].isupper() or prefix == "":   # a class body: its methods
                    walk(const, f"{name}.")
    walk(code, "")
    return found


def check_harness_code(modules):
    """Every function and method of the harness's modules (prepare.py's and harness/'s) is the one its frozen source
    file compiles to, whatever train.py assigned to the modules' attributes. One line naming the first that is not."""
    for module in modules:
        frozen = _frozen_functions(module.__file__)
        for name, obj in vars(module).items():
            targets = [(name, obj)]
            if isinstance(obj, type) and obj.__module__ == module.__name__:   # methods, class methods unwrapped
                targets = [(f"{name}.{k}", getattr(v, "__func__", v)) for k, v in vars(obj).items()]
            for qualified, fn in targets:
                if not isinstance(fn, types.FunctionType) or fn.__module__ != module.__name__:
                    continue
                if qualified in frozen and not _code_matches(fn.__code__, frozen[qualified]):
                    raise HarnessError(f"{module.__name__}.{qualified} is not the function of {Path(module.__file__).name}"
                                       f" (train.py replaced it): no val_bpb is reported; remove that code")
            if isinstance(obj, types.FunctionType) and obj.__module__ != module.__name__ and name in frozen:
                raise HarnessError(f"{module.__name__}.{name} was replaced (by {obj.__module__}.{obj.__qualname__}): "
                                   f"no val_bpb is reported; remove that code from train.py")


def fingerprint(paths):
    """sha256 of the files the metric depends on, by name: what the cache was built with, or what a run read."""
    out = {}
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[Path(path).name] = digest.hexdigest()
    return out


def check_anchors(anchors_path, paths):
    """The metric's files against the fingerprints prepare.py took when it built them (the anchors), in one line."""
    try:
        anchors = json.loads(Path(anchors_path).read_text())
    except (OSError, ValueError):
        return None   # a cache prepared before anchors were kept: the records and the recomputation still hold
    now = fingerprint(paths)
    changed = [name for name, digest in now.items() if anchors.get(name) != digest]
    if changed:
        raise HarnessError(f"{', '.join(changed)} changed since `uv run prepare.py` built the cache (its anchors in "
                           f"{anchors_path}): the metric's files must not change during a night; run `uv run "
                           f"prepare.py` again to rebuild them, and rerun the baseline")
    return hashlib.sha256(json.dumps(now, sort_keys=True).encode()).hexdigest()[:16]


class Probe:
    """The causality probe, drawn from the OS for each run (never a seed train.py can read): a few of the scoring
    batches, each probed before or after it is scored, in an order the model cannot predict. A probe call is shaped
    like a scoring call: the same rows, with the future of two of them, drawn at random, replaced from a cut drawn at
    random. No logit before a row's cut may move (nor leak across rows) by more than bf16 rounding of that
    position's own logits."""

    def __init__(self, n_batches, T, batches=4):
        self.rng, self.T = np.random.default_rng(secrets.randbits(128)), T
        self.batches = set(self.rng.choice(n_batches, size=min(batches, n_batches), replace=False).tolist())
        self.first = {i: bool(self.rng.integers(2)) for i in self.batches}   # probe before the scoring call, or after

    def plan(self, b):
        """(rows, cuts) for one probed batch of b rows."""
        rows = self.rng.choice(b, size=min(2, b), replace=False)
        return rows, self.rng.integers(1, self.T, size=len(rows))

    def perturbed(self, batch, rows, cuts, vocab_size):
        probe = batch.clone()   # the same layout as the scored batch: a view of it would compile again
        for row, cut in zip(rows.tolist(), cuts.tolist()):   # every input from the cut on differs
            shift = _tensor(self.rng.integers(1, vocab_size, size=self.T - cut)).to(probe.device)
            probe[row, cut:self.T] = (probe[row, cut:self.T] + shift) % vocab_size
        return probe

    @staticmethod
    def keep(logits, rows, cuts):
        """Small copies of what the comparison needs: each probed row before its cut."""
        return [logits[row, :cut].float().clone() for row, cut in zip(rows.tolist(), cuts.tolist())]

    @staticmethod
    def compare(scored, probed, cuts):
        for a, p, cut in zip(scored, probed, cuts.tolist()):
            tolerance = 2 ** -7 * a.abs().amax(dim=-1).clamp(min=1.0)   # per position: its own logits' bf16 step
            moved = (a - p).abs().amax(dim=-1)
            bad = (~(moved <= tolerance)).nonzero()
            if len(bad):
                pos = int(bad[0, 0])
                raise HarnessError(
                    f"the model sees the future: changing tokens from position {cut} of a row moved its logits at "
                    f"position {pos} by {moved[pos].item():.4g} (tolerance {tolerance[pos].item():.2g}); attention "
                    f"must be causal and rows independent, so no val_bpb is reported")


def _tensor(array):
    import torch
    return torch.from_numpy(np.asarray(array, dtype=np.int64))
