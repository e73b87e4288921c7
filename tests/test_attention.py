"""
The harness's attention kernel (harness/attention.py, prepare.load_attention): Flash Attention 3 through the REAL
kernels client from a fake kernel hub on 127.0.0.1 (tests/hf_server.py), pinned at first use and loaded from the
hub cache afterwards, also offline; the fall-through between repos; the check that sends a kernel to the fallback.
There is no GPU here: AUTORESEARCH_FA3_ON_CPU (test-only) runs FA3's path on the CPU, with a Python kernel.
"""

import ast
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import prepare
from harness import attention
from hf_server import fa3_kernel_files, serve

ROOT = Path(__file__).resolve().parent.parent
HOPPER, OTHER = prepare.FA3_REPO_HOPPER, prepare.FA3_REPO_OTHER

# What train.py's setup does, at toy size: head dim 64, a sliding window of 16 and a full one, 32 tokens
LOAD = ("import json, sys, torch, prepare; prepare.FA3_REVISIONS.update(json.loads(sys.argv[1])); "
        "a = prepare.load_attention(torch.device('cpu'), 64, [16, 32, 32], 32); print(a.path); print(a.description)")


def kernel_env(tmp_path, capability, **extra):
    """A run on the CPU as if on a GPU of `capability`, with its own hub cache and harness cache. Not
    HF_HUB_DISABLE_TELEMETRY (conftest's): under it kernels 0.17.2 sends an invalid User-Agent and fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "HF_"))}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "AUTORESEARCH_CACHE": str(tmp_path / "cache"),
            "AUTORESEARCH_FA3_ON_CPU": capability, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", **extra}


def load(env, revisions=None):
    """prepare.load_attention in a fresh process (the hub client reads HF_* at import): (path, description)."""
    proc = subprocess.run([sys.executable, "-c", LOAD, json.dumps(revisions or {})], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, description = proc.stdout.strip().splitlines()[-2:]
    return path, description


def pins(tmp_path):
    return json.loads((tmp_path / "cache" / "attention.json").read_text())

# ---------------------------------------------------------------------------
# Through the real kernels client and a local hub


@pytest.mark.slow
def test_first_load_pins_the_commit_and_later_runs_load_it_from_the_cache_even_offline(tmp_path):
    with serve(tmp_path / "hub") as hub:
        first = hub.add_kernel(OTHER, fa3_kernel_files())
        env = kernel_env(tmp_path, "8.0", HF_ENDPOINT=hub.url)
        path, description = load(env)
        assert path == f"fa3:{OTHER}@{first[:12]}"
        assert description == (f"Flash Attention 3, {OTHER}@{first} (v1 resolved now and pinned from here on in "
                               f"{tmp_path / 'cache' / 'attention.json'}; `uv run prepare.py --repin-attention` "
                               f"moves it)")
        assert ("GET", f"/api/kernels/{OTHER}/refs", None) in hub.requests   # v1 looked up through the hub API
        pinned = pins(tmp_path)["other"]["pinned"]
        assert pins(tmp_path) == {"other": {"repo": OTHER, "commit": first, "pinned": pinned}}
        hub.add_kernel(OTHER, fa3_kernel_files(broken="backward"))   # v1 moves mid-night, to a kernel that fails
        del hub.requests[:]
        path, description = load(env)
        assert path == f"fa3:{OTHER}@{first[:12]}" and not hub.requests   # the pinned commit, no hub request
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", pinned)
        pin_file = tmp_path / "cache" / "attention.json"
        assert f"{OTHER}@{first} (pinned at first use on {pinned} in {pin_file}; `uv run prepare.py" in description
    path, description = load({**env, "HF_HUB_OFFLINE": "1"})   # the hub stopped, and offline mode
    assert path == f"fa3:{OTHER}@{first[:12]}" and "pinned at first use" in description


@pytest.mark.slow
def test_a_repo_without_v1_falls_through_to_the_next_one(tmp_path):
    with serve(tmp_path / "hub") as hub:
        hub.add_kernel(HOPPER, fa3_kernel_files(name="flash-attention-3"), branches=("main", "v2"))
        commit = hub.add_kernel(OTHER, fa3_kernel_files())
        path, description = load(kernel_env(tmp_path, "9.0", HF_ENDPOINT=hub.url))
    assert path == f"fa3:{OTHER}@{commit[:12]}" and "v1 resolved now and pinned" in description
    refs = [p for m, p, _ in hub.requests if p.endswith("/refs")]
    assert refs == [f"/api/kernels/{HOPPER}/refs", f"/api/kernels/{OTHER}/refs"]   # Hopper's repo first
    assert pins(tmp_path)["hopper"]["repo"] == OTHER   # what this kind of GPU runs from now on


@pytest.mark.slow
def test_a_kernel_that_fails_its_check_eager_or_compiled_gives_the_fallback_with_the_reason(tmp_path):
    """Hopper's repo runs right eagerly but fails under torch.compile; the other's backward is wrong."""
    with serve(tmp_path / "hub") as hub:
        compiled = hub.add_kernel(HOPPER, fa3_kernel_files(broken="compile", name="flash-attention-3"))
        backward = hub.add_kernel(OTHER, fa3_kernel_files(broken="backward"))
        path, description = load(kernel_env(tmp_path, "9.0", HF_ENDPOINT=hub.url))
    assert path == "sdpa-cpu"
    why = description.partition("Flash Attention 3 unavailable: ")[2]
    assert why.startswith(f"{HOPPER}@{compiled} fails its check at head_dim 64: RuntimeError: it fails under "
                          f"torch.compile at window 16: "), why
    assert f"; {OTHER}@{backward} fails its check at head_dim 64: RuntimeError: dq at window 16 differs" in why
    assert not (tmp_path / "cache" / "attention.json").exists()   # nothing pinned


@pytest.mark.slow
def test_a_commit_in_fa3_revisions_wins_and_repin_resolves_v1_again(tmp_path):
    with serve(tmp_path / "hub") as hub:
        first = hub.add_kernel(OTHER, fa3_kernel_files())
        env = kernel_env(tmp_path, "8.0", HF_ENDPOINT=hub.url)
        assert load(env)[0] == f"fa3:{OTHER}@{first[:12]}"
        second = hub.add_kernel(OTHER, {**fa3_kernel_files(), "README.md": b"v1 moved\n"})
        path, description = load(env, {OTHER: second})
        assert path == f"fa3:{OTHER}@{second[:12]}"
        assert description == f"Flash Attention 3, {OTHER}@{second} (pinned in prepare.py FA3_REVISIONS)"
        assert pins(tmp_path)["other"]["commit"] == first   # the recorded pin is left as it was
        proc = subprocess.run([sys.executable, "prepare.py", "--repin-attention"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == (f"attention: forgot the pins in {tmp_path / 'cache' / 'attention.json'}; the "
                                       f"next run that loads FA3 on a GPU pins anew")
        path, description = load(env)
        assert path == f"fa3:{OTHER}@{second[:12]}" and "v1 resolved now and pinned" in description
        assert pins(tmp_path)["other"]["commit"] == second


def test_without_the_kernels_package_the_fallback_says_so(tmp_path):
    """The GPU machines' own python has no kernels: FA3 is unavailable, in one reason, with no hub request."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['kernels'] = None   # `import kernels` fails\n")
    env = kernel_env(tmp_path, "9.0", PYTHONPATH=os.pathsep.join([str(shim), str(ROOT)]))
    path, description = load(env)
    assert path == "sdpa-cpu"
    assert description.endswith("Flash Attention 3 unavailable: the kernels package is not installed "
                                "(ModuleNotFoundError: import of kernels halted; None in sys.modules)")


def test_the_loader_uses_the_public_kernels_api_only():
    """No `kernels._...` import or attribute anywhere outside the tests; what the loader takes is in kernels.__all__."""
    import kernels
    product = [*ROOT.glob("*.py"), *(ROOT / "harness").glob("*.py"), *(ROOT / "tools").glob("*.py")]
    used = set()
    for path in product:
        src = path.read_text()
        assert not re.search(r"\bkernels\._", src), path
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kernels":
                assert node.module == "kernels", (path, node.module)
                used |= {alias.name for alias in node.names}
            if isinstance(node, ast.Import):
                assert not [a.name for a in node.names if a.name.startswith("kernels.")], path
    assert used == {"get_kernel", "get_local_kernel"} and used <= set(kernels.__all__)

# ---------------------------------------------------------------------------
# The check, in this process, and the loader offline (moved here from test_train.py)


class FakeKernel:
    """Stands in for FA3's interface module on the CPU: the fallback's math, optionally with one thing broken."""

    def __init__(self, broken=None):
        self.broken = broken

    def flash_attn_func(self, q, k, v, causal, window_size):
        window = q.size(1) if self.broken == "window" else window_size[0]   # ignores the sliding window
        y = attention.fallback_attention(q, k, v, window)
        if self.broken == "backward":   # right forward, no gradient for q and k
            y = y.detach() + (v - v.detach()).mean() * 0
        return y, None   # FA3 returns (out, softmax_lse)


@pytest.mark.parametrize("broken, message",
                         [(None, None), ("backward", "dq at window"), ("window", "output at window 16")])
def test_fa3_check_runs_forward_and_backward_at_the_real_head_dim_and_windows(broken, message):
    check = lambda: attention.check_flash_attention_3(FakeKernel(broken), 64, [16, 32, 32], 32, device="cpu")
    if message is None:
        check()
    else:
        with pytest.raises(RuntimeError, match=message):
            check()


def test_on_the_cpu_the_harness_never_asks_for_fa3(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_FA3_ON_CPU", raising=False)
    monkeypatch.setattr(attention, "fetch_flash_attention_3", lambda *a: pytest.fail("FA3 fetched on the CPU"))
    chosen = attention.choose_attention("cpu", 64, [16], 32, {"hopper": HOPPER, "other": OTHER}, {}, 1,
                                        tmp_path / "attention.json")
    assert chosen.path == "sdpa-cpu" and chosen.kernel is None


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # nothing listens there once the socket is closed


FETCH = ("import sys, prepare; from harness.attention import fetch_flash_attention_3; "
         "kernel, why = fetch_flash_attention_3(prepare.FA3_REPO_HOPPER, sys.argv[1], prepare.FA3_VERSION); "
         "print(kernel, why, sep='|')")


@pytest.mark.parametrize("pin", ["", "0123456789abcdef0123456789abcdef01234567"])
@pytest.mark.parametrize("how", ["closed port", "HF_HUB_OFFLINE"])
def test_fa3_loader_classifies_no_network_in_one_line_without_retries(tmp_path, pin, how):
    """The real hub client, really offline: one line saying so, and no minute of retries."""
    port = closed_port()
    net = {"HF_ENDPOINT": f"http://127.0.0.1:{port}"} if how == "closed port" else {"HF_HUB_OFFLINE": "1"}
    env = kernel_env(tmp_path, "", **net)
    proc = subprocess.run([sys.executable, "-c", FETCH, pin], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kernel, why = proc.stdout.strip().split("|")
    assert kernel == "None" and why.startswith("offline: ") and "\n" not in why
    assert "Retry" not in proc.stderr   # the hub client's backoff never started
    if how == "closed port":
        assert f"cannot reach http://127.0.0.1:{port}" in why
    else:
        assert f"{prepare.FA3_REPO_HOPPER}@{pin or 'v1'}: HF_HUB_OFFLINE is set" in why


def test_hub_client_transport_errors_count_as_offline():
    """httpx2's ConnectError (the hub client's, no OSError) from a real refused connection, bare or wrapped."""
    import httpx2
    try:
        httpx2.get(f"http://127.0.0.1:{closed_port()}/api/kernels", timeout=10)
    except Exception as e:
        refused = e
    try:
        raise RuntimeError("resolving the kernel failed") from refused
    except RuntimeError as e:
        wrapped = e
    assert not isinstance(refused, OSError)  # why the old `isinstance(e, OSError)` never said "offline"
    assert attention._is_offline(refused) and attention._is_offline(wrapped)
    assert not attention._is_offline(ValueError("Version 1 not found, available versions: 2"))


def test_fa3_pins_are_commits_not_branches():
    assert set(prepare.FA3_REVISIONS) == {prepare.FA3_REPO_HOPPER, prepare.FA3_REPO_OTHER}
    for repo, pin in prepare.FA3_REVISIONS.items():   # "" = not pinned here (docs/gpu.md: pinned at first use)
        assert pin == "" or re.fullmatch(r"[0-9a-f]{40}", pin), f"{repo}: {pin!r} is not a full commit sha"


def test_importing_the_harness_loads_no_kernels_hub_client_or_rustbpe(tmp_path):
    """The GPU machines' python has no kernels and no rustbpe: prepare.py and the CPU path never import them."""
    code = ("import sys, torch, prepare; prepare.load_attention(torch.device('cpu'), 64, [16], 32); "
            "print(sorted(m for m in ('kernels', 'huggingface_hub', 'rustbpe') if m in sys.modules))")
    env = {**kernel_env(tmp_path, ""), "AUTORESEARCH_FA3_ON_CPU": ""}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
