"""
Attention for every experiment of a night: Flash Attention 3 from the kernels hub (its public get_kernel, at a
pinned commit or a version branch), checked forward and backward against plain masked attention at the model's
head dim and windows, or else the PyTorch fallback: causal SDPA, flex_attention for sliding windows on a GPU, an
explicit mask on the CPU. One function with FA3's signature, whichever runs.
"""

import os
import re

from harness.download import connect_error
from harness.errors import first_line


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


def fetch_flash_attention_3(repo, revision, version):
    """FA3's interface module from the kernels hub, tried once: (module, commit) or (None, why). At `revision` (a
    full commit) when pinned, else at the kernels-hub `version` branch, whose commit the downloaded snapshot names."""
    from huggingface_hub import constants
    if not constants.HF_HUB_OFFLINE:
        unreachable = _hub_unreachable(constants.ENDPOINT)
        if unreachable:
            return None, f"offline: {unreachable}; HF_HUB_OFFLINE=1 uses a cached kernel without trying the network"
    where = f"{repo}@{revision or f'v{version}'}"
    try:
        from kernels import get_kernel
        at = dict(revision=revision) if revision else dict(version=version)
        module = get_kernel(repo, trust_remote_code=[repo], **at)
        return module.flash_attn_interface, revision or snapshot_commit(module) or f"v{version}"
    except Exception as e:
        if constants.HF_HUB_OFFLINE or _is_offline(e):
            why = "HF_HUB_OFFLINE is set and it is not in the local cache" if constants.HF_HUB_OFFLINE else \
                f"cannot reach {constants.ENDPOINT}"
            return None, f"offline: {where}: {why} ({first_line(e)[:160]})"
        return None, f"{where}: {first_line(e)[:200]}"


def snapshot_commit(module):
    """The commit a kernel module was loaded from: the hub cache keeps each download under snapshots/<commit>/."""
    found = re.search(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]", getattr(module, "__file__", None) or "")
    return found and found[1]


def check_flash_attention_3(kernel, head_dim, windows, seq_len, device="cuda"):
    """FA3's forward and backward at the model's head dim, windows and length, against the plain masked reference."""
    import torch
    gen = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(1, seq_len, 2, head_dim, generator=gen).to(device, torch.bfloat16) for _ in range(4))
    for window in sorted(set(windows)):
        results = []
        ours = Attention(kernel, "", "").flash_attn_func
        for attend in (lambda *t: ours(*t, causal=True, window_size=(window, 0)),
                       lambda *t: masked_attention(*(x.float().transpose(1, 2) for x in t), window).transpose(1, 2)):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            y = attend(*leaves)
            y.backward(dy)
            results.append([y.float(), *(torch.zeros_like(t) if t.grad is None else t.grad.float() for t in leaves)])
        for name, ours, ref in zip(("output", "dq", "dk", "dv"), *results):
            error, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
            if not error <= 0.03 * max(scale, 1.0):   # bf16 rounding, with room; a wrong mask is off by O(1)
                raise RuntimeError(f"{name} at window {window} differs from masked attention by {error:.3g}")

def choose_attention(device, head_dim, windows, seq_len, repos, revisions, version):
    """The attention of a run, decided once: FA3 from the first of `repos` (by compute capability: (9, 0) and
    every other) when it loads and passes its check, at its commit in `revisions` if pinned; else the fallback."""
    import torch
    if torch.device(device).type != "cuda":
        return Attention(None, "sdpa-cpu", "PyTorch SDPA with an explicit sliding-window mask (CPU; FA3 and "
                         "flex_attention need a GPU)")
    repo = repos["hopper" if torch.cuda.get_device_capability() == (9, 0) else "other"]
    kernel, commit = fetch_flash_attention_3(repo, revisions.get(repo, ""), version)
    why = commit
    if kernel is not None:
        try:
            check_flash_attention_3(kernel, head_dim, windows, seq_len)
            pinned = "pinned" if revisions.get(repo) else f"NOT pinned: v{version} resolved now, see docs/gpu.md"
            return Attention(kernel, f"fa3:{repo}@{commit[:12]}", f"Flash Attention 3, {repo}@{commit} ({pinned})")
        except Exception as e:
            why = f"{repo}@{commit} fails its check at head_dim {head_dim}: {first_line(e)[:200]}"
    for window in set(windows):   # built here, once, not inside the compiled graph
        if 0 <= window < seq_len - 1:
            sliding_window_mask(window, seq_len, torch.device(device))
    return Attention(None, "flex+sdpa", f"PyTorch fallback, flex_attention (sliding windows) + causal SDPA, slower "
                     f"than FA3; Flash Attention 3 unavailable: {why}")
