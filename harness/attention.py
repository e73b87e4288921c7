"""
Attention for every experiment of a night: Flash Attention 3 from the kernels hub through its public API, pinned
to one commit at its first successful load and reused from the hub cache (no hub request, also offline) until the
user moves the pin; checked forward and backward, called directly and through torch.compile, against plain masked
attention at the model's head dim and windows; or else the PyTorch fallback: causal SDPA, flex_attention for
sliding windows on a GPU, an explicit mask on the CPU. One function with FA3's signature, whichever runs.
"""

import datetime
import json
import os
import re
from pathlib import Path

from harness.download import connect_error
from harness.errors import first_line
from harness.records import atomic_write

# Test-only: "9.0" runs FA3's loading and check on the CPU as on a GPU of that compute capability (the tests'
# kernel is Python); read here in choose_attention alone, never set by the harness.
FA3_ON_CPU = "AUTORESEARCH_FA3_ON_CPU"
REPIN = "uv run prepare.py --repin-attention"


class Attention:
    """What train.py calls: flash_attn_func(q, k, v, causal=True, window_size=(window, 0)) on (B, T, H, D), FA3's
    signature, where query i attends to keys i - window ... i. `path` names the kernel for the summary block."""

    def __init__(self, kernel, path, description):
        self.kernel, self.path, self.description = kernel, path, description
        self.fallback = fallback_attention      # PyTorch, used when kernel is None

    def flash_attn_func(self, q, k, v, causal=True, window_size=(-1, -1)):
        if not causal or window_size[1] != 0:
            raise ValueError("the harness's attention is causal only: call it with causal=True, window_size=(w, 0)")
        q, k = q.to(v.dtype), k.to(v.dtype)   # one dtype: under autocast the QK-norm may return float32
        if self.kernel is None:
            return self.fallback(q, k, v, window_size[0])
        y = self.kernel.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        return y[0] if isinstance(y, tuple) else y


def masked_attention(q, k, v, window):
    """Plain causal attention with an explicit (T, T) mask, on (B, H, T, D): the CPU path and the reference."""
    import torch
    import torch.nn.functional as F
    i = torch.arange(q.size(2), device=q.device)
    keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= window)   # (T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


_block_masks = {}   # (window, T) -> flex_attention BlockMask, built once per run outside the compiled graph


def sliding_window_mask(window, T, device):
    """flex_attention block mask: query i sees keys i - window ... i. Block-sparse, no T x T tensor."""
    if (window, T) not in _block_masks:
        from torch.nn.attention.flex_attention import create_block_mask

        def keep(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
        _block_masks[window, T] = create_block_mask(keep, None, None, T, T, device=device)
    return _block_masks[window, T]


def fallback_attention(q, k, v, window):
    """Causal sliding-window attention in PyTorch on (B, T, H, D): SDPA, flex_attention on a GPU, a mask on the CPU."""
    import torch.nn.functional as F
    T = q.size(1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))   # (B, H, T, D)
    if window < 0 or window >= T - 1:   # the window covers the whole causal past
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif q.is_cuda:
        from torch.nn.attention.flex_attention import flex_attention
        y = flex_attention(q, k, v, block_mask=sliding_window_mask(window, T, q.device))
    else:   # the CPU has no flex_attention backward; an explicit mask is fine at toy sizes
        y = masked_attention(q, k, v, window)
    return y.transpose(1, 2)


def _hub_unreachable(endpoint):
    """Why the hub cannot be reached, or None; through a proxy a direct connection says nothing, so None."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    error = connect_error(endpoint, timeout=3.0)
    return error and f"cannot reach {endpoint} ({error})"


def _is_offline(e):
    """Whether an exception, or one it came from, means that the hub was not reached: no network, or offline mode."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    while e is not None:
        if isinstance(e, (ConnectionError, TimeoutError, LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        kinds = type(e).__mro__   # the hub client's transport errors (httpx2 in huggingface_hub 2.x) are no OSError
        if type(e).__module__.startswith("httpx") and any(k.__name__ == "TransportError" for k in kinds):
            return True
        e = e.__cause__ or e.__context__
    return False


def cached_snapshot(repo, commit):
    """The hub cache's folder of a kernel repo at a commit, if a download left its build there, else None."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    cache = os.environ.get("KERNELS_CACHE") or constants.HF_HUB_CACHE   # where the kernels client downloads to
    path = Path(cache) / repo_folder_name(repo_id=repo, repo_type="kernel") / "snapshots" / commit
    return path if (path / "build").is_dir() else None


def fetch_flash_attention_3(repo, revision, version):
    """FA3's interface module, tried once: (module, commit) or (None, why). A commit (`revision`) that the hub cache
    holds loads from there with no hub request; else get_kernel fetches that commit, or, unpinned, the commit that
    the version branch v`version` points to now (named by the snapshot it downloads to)."""
    try:
        from kernels import get_kernel, get_local_kernel
    except ImportError as e:
        return None, f"the kernels package is not installed ({first_line(e)[:120]})"
    from huggingface_hub import constants
    where = f"{repo}@{revision or f'v{version}'}"
    snapshot, local_error = revision and cached_snapshot(repo, revision), ""
    if snapshot:
        # By path: kernels 0.17.2's offline get_kernel(revision=) rejects a snapshot that holds one build variant
        # of the several the repo lists (IncompleteSnapshotError), which is every FA3 download
        try:
            return get_local_kernel(snapshot).flash_attn_interface, revision
        except Exception as e:
            local_error = f"; its cached copy fails to load ({first_line(e)[:160]})"
    if constants.HF_HUB_OFFLINE:
        return None, f"offline: {where}: HF_HUB_OFFLINE is set and it is not in the hub cache{local_error}"
    unreachable = _hub_unreachable(constants.ENDPOINT)
    if unreachable:
        return None, f"offline: {unreachable}{local_error}; HF_HUB_OFFLINE=1 uses a cached kernel without trying"
    try:
        at = dict(revision=revision) if revision else dict(version=version)
        module = get_kernel(repo, trust_remote_code=[repo], **at)
        commit = revision or snapshot_commit(module)
        if not commit:
            return None, f"{where}: loaded from {module.__file__}, which names no commit to pin"
        return module.flash_attn_interface, commit
    except Exception as e:
        if _is_offline(e):
            return None, f"offline: {where}: cannot reach {constants.ENDPOINT} ({first_line(e)[:160]})"
        why = first_line(e)[:200]
        if constants.HF_HUB_DISABLE_TELEMETRY and "Illegal header value" in why:   # an empty User-Agent item
            why += "; kernels 0.17.2 sends an invalid User-Agent under HF_HUB_DISABLE_TELEMETRY=1: unset it"
        return None, f"{where}: {why}"


def snapshot_commit(module):
    """The commit a kernel module was loaded from: the hub cache keeps each download under snapshots/<commit>/."""
    found = re.search(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]", getattr(module, "__file__", None) or "")
    return found and found[1]


def _forward_backward(attend, q, k, v, dy, n):
    """attend(q, k, v) returns one output per window; [output, dq, dk, dv] of the n-th, in float32."""
    import torch
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y = attend(*leaves)[n]
    y.backward(dy)
    return [y.detach().float(), *(torch.zeros_like(t) if t.grad is None else t.grad.float() for t in leaves)]


def check_flash_attention_3(kernel, head_dim, windows, seq_len, device="cuda"):
    """FA3's forward and backward at the model's head dim, windows and length against plain masked attention, called
    directly and through torch.compile as the model calls it: a kernel that fails only compiled fails here."""
    import torch
    gen = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(1, seq_len, 2, head_dim, generator=gen).to(device, torch.bfloat16) for _ in range(4))
    windows, fa3 = sorted(set(windows)), Attention(kernel, "", "").flash_attn_func

    def fa3_check(q, k, v):   # every window in one graph: one compile, no recompiles
        return [fa3(q, k, v, causal=True, window_size=(w, 0)) for w in windows]

    def reference(q, k, v):
        return [masked_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), w).transpose(1, 2) for w in windows]
    # inductor on a GPU, as train.py compiles its model; aot_eager on the CPU (tests), which traces the same way
    compiled = torch.compile(fa3_check, dynamic=False, **({} if q.is_cuda else dict(backend="aot_eager")))
    for n, window in enumerate(windows):
        expected = _forward_backward(reference, q, k, v, dy, n)
        for how, attend in (("", fa3_check), (" under torch.compile", compiled)):
            try:
                results = _forward_backward(attend, q, k, v, dy, n)
            except Exception as e:
                raise RuntimeError(f"it fails{how} at window {window}: {first_line(e)[:200]}") from e
            for name, ours, ref in zip(("output", "dq", "dk", "dv"), results, expected):
                error, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
                if not error <= 0.03 * max(scale, 1.0):   # bf16 rounding, with room; a wrong mask is off by O(1)
                    raise RuntimeError(f"{name}{how} at window {window} differs from masked attention by {error:.3g}")


def read_pins(pin_file):
    """The pins recorded at first use, {"hopper" or "other": {"repo", "commit", "pinned"}}; {} if none or unreadable."""
    try:
        pins = json.loads(Path(pin_file).read_text())
    except (OSError, ValueError):
        return {}
    return {gpu: pin for gpu, pin in pins.items() if isinstance(pin, dict) and isinstance(pin.get("repo"), str)
            and re.fullmatch(r"[0-9a-f]{40}", str(pin.get("commit"))) and isinstance(pin.get("pinned"), str)}


def record_pin(pin_file, gpu, repo, commit):
    """Pin `repo`@`commit` for this kind of GPU, atomically; what the attention line says about it."""
    pins = read_pins(pin_file)
    pins[gpu] = dict(repo=repo, commit=commit, pinned=f"{datetime.datetime.now():%Y-%m-%d %H:%M}")
    try:
        Path(pin_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(pin_file, lambda tmp: tmp.write_text(json.dumps(pins, indent=1) + "\n"))
    except (OSError, SystemExit) as e:   # SystemExit: the harness's disk-full error
        return f"resolved now, NOT pinned: {pin_file} cannot be written ({first_line(e)[:120]})"
    return f"resolved now and pinned from here on in {pin_file}; `{REPIN}` moves it"


def forget_pins(pin_file):
    """`prepare.py --repin-attention`: the next run that loads FA3 on each kind of GPU resolves and pins it anew."""
    Path(pin_file).unlink(missing_ok=True)


def _capability(device):
    """The compute capability FA3 is chosen for: the GPU's, or on the CPU the test-only FA3_ON_CPU's, else None."""
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    given = re.fullmatch(r"(\d+)\.(\d+)", os.environ.get(FA3_ON_CPU, "").strip())
    return given and (int(given[1]), int(given[2]))


def choose_attention(device, head_dim, windows, seq_len, repos, revisions, version, pin_file):
    """The attention of a run, decided once. FA3 from `repos` ({"hopper": repo, "other": repo}; compute capability
    (9, 0) tries both, in that order, every other GPU the second): at its commit in `revisions` when one is pinned
    there, else at the commit this kind of GPU pinned at first use in `pin_file`, else at the commit v`version`
    points to now, which is then pinned; when it loads and passes its check. Else the fallback, saying why."""
    import torch
    device = torch.device(device)
    capability = _capability(device)
    if not capability:
        return Attention(None, "sdpa-cpu", "PyTorch SDPA with an explicit sliding-window mask (CPU; FA3 and "
                         "flex_attention need a GPU)")
    gpu = "hopper" if tuple(capability) == (9, 0) else "other"
    candidates = [repos["hopper"], repos["other"]] if gpu == "hopper" else [repos["other"]]
    recorded = read_pins(pin_file).get(gpu)
    tries = [(repo, revisions[repo], "pinned in prepare.py FA3_REVISIONS") for repo in candidates
             if revisions.get(repo)][:1]
    if not tries and recorded and recorded["repo"] in candidates:
        tries = [(recorded["repo"], recorded["commit"], f"pinned at first use on {recorded['pinned']} in {pin_file}; "
                  f"`{REPIN}` moves it")]
    tries = tries or [(repo, "", None) for repo in candidates]
    reasons = []
    for repo, revision, pinned in tries:
        kernel, commit = fetch_flash_attention_3(repo, revision, version)
        if kernel is None:
            reasons += [commit] if commit not in reasons else []   # no kernels package: once, not per repo
            continue
        try:
            check_flash_attention_3(kernel, head_dim, windows, seq_len, device)
        except Exception as e:
            reasons.append(f"{repo}@{commit} fails its check at head_dim {head_dim}: {first_line(e)[:300]}")
            continue
        how = pinned or f"v{version} " + record_pin(pin_file, gpu, repo, commit)
        return Attention(kernel, f"fa3:{repo}@{commit[:12]}", f"Flash Attention 3, {repo}@{commit} ({how})")
    if tries[0][1]:
        reasons.append(f"the pin stays; `{REPIN}` moves it")
    if device.type != "cuda":   # the test-only FA3_ON_CPU
        return Attention(None, "sdpa-cpu", f"PyTorch SDPA with an explicit sliding-window mask (CPU); Flash "
                         f"Attention 3 unavailable: {'; '.join(reasons)}")
    for window in set(windows):   # built here, once, not inside the compiled graph
        if 0 <= window < seq_len - 1:
            sliding_window_mask(window, seq_len, device)
    return Attention(None, "flex+sdpa", f"PyTorch fallback, flex_attention (sliding windows) + causal SDPA, slower "
                     f"than FA3; Flash Attention 3 unavailable: {'; '.join(reasons)}")
