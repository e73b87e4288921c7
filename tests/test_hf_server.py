"""The fake hub in hf_server.py works with the real huggingface_hub client.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE, HF_HUB_*_TIMEOUT... into `huggingface_hub.constants`
when it is first imported, so every download runs in a fresh subprocess with its own environment. That also
keeps ~/.cache and the internet out of it: HF_HOME is a tmp dir and the only endpoint is 127.0.0.1.
"""

import json
import os
import subprocess
import sys

import pytest

from hf_server import serve

MiB = 1 << 20
CHUNK = 10 * MiB  # huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE: the granularity of in-call resumes

# Runs in the child: one hf_hub_download call, the outcome as one JSON line on stdout.
CLIENT = """
import json, sys
from huggingface_hub import hf_hub_download
try:
    path = hf_hub_download(repo_id="karpathy/climbmix-400b-shuffle", repo_type="dataset", revision="main",
                           filename=sys.argv[1], local_dir=sys.argv[2])
    print(json.dumps({"path": path}))
except Exception as e:
    print(json.dumps({"error": [f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__], "msg": str(e)}))
"""


def download(hub, filename, local_dir, home, **env):
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    child_env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),  # token, caches: nothing read from or written to ~/.cache
        HF_HUB_DISABLE_TELEMETRY="1",  # else a GET {endpoint}/api/agent-harnesses per process
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DOWNLOAD_TIMEOUT="5",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    child_env.update(env)
    proc = subprocess.run([sys.executable, "-c", CLIENT, filename, str(local_dir)], env=child_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def leftovers(local_dir):
    return sorted(p.name for p in local_dir.rglob("*.incomplete"))


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    files = {"shard_00000.parquet": os.urandom(3 * MiB + 17), "shard_00001.parquet": os.urandom(12 * MiB + 5)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, files, tmp_path / "data", tmp_path / "hf_home"


@pytest.mark.parametrize("redirect", [True, False])
def test_plain_download_is_byte_identical(repo, redirect):
    root, files, data_dir, home = repo
    with serve(root, redirect=redirect) as hub:
        for name, data in files.items():
            out = download(hub, name, data_dir, home)
            assert out == {"path": str(data_dir / name)}
            assert (data_dir / name).read_bytes() == data
        assert hub.ranges("shard_00000.parquet") == [None]  # one plain GET, no Range
        assert leftovers(data_dir) == []
        # A second call only HEADs: the etag in local_dir/.cache/huggingface/download/*.metadata matches.
        assert download(hub, "shard_00000.parquet", data_dir, home) == {"path": str(data_dir / "shard_00000.parquet")}
        assert hub.count("HEAD", "shard_00000.parquet") == 2 and hub.count("GET", "shard_00000.parquet") == 1
        assert not any("xet" in p.lower() for _, p, _ in hub.requests)


@pytest.mark.parametrize("mode", ["close", "stall"])
def test_dropped_connection_is_resumed_with_range_within_the_call(repo, mode):
    root, files, data_dir, home = repo
    name = "shard_00001.parquet"  # 12 MiB: one full 10 MiB chunk is on disk when the cut hits at 11 MiB
    with serve(root) as hub:
        hub.cut(name, after_bytes=11 * MiB, times=1, mode=mode)
        out = download(hub, name, data_dir, home, HF_HUB_DOWNLOAD_TIMEOUT="1")
        assert out == {"path": str(data_dir / name)}
        assert (data_dir / name).read_bytes() == files[name]
        assert hub.ranges(name) == [None, f"bytes={CHUNK}-"]
        assert leftovers(data_dir) == []


def test_reset_connection_raises_leaves_nothing_and_rerun_repairs(repo):
    root, files, data_dir, home = repo
    name = "shard_00001.parquet"
    with serve(root) as hub:
        hub.cut(name, after_bytes=11 * MiB, times=1, mode="reset")  # RST: not retried by the client
        out = download(hub, name, data_dir, home)
        assert out["error"][0] == "httpx2.ReadError", out
        assert not (data_dir / name).exists()
        assert leftovers(data_dir) == []  # the per-call .incomplete file is deleted on error...
        out = download(hub, name, data_dir, home)
        assert out == {"path": str(data_dir / name)}
        assert (data_dir / name).read_bytes() == files[name]
        assert hub.ranges(name) == [None, None]  # ... so the rerun starts again from byte 0


def test_missing_file_raises_entry_not_found(repo):
    root, files, data_dir, home = repo
    with serve(root) as hub:
        out = download(hub, "shard_06542.parquet", data_dir, home)
    assert out["error"][0] == "huggingface_hub.errors.RemoteEntryNotFoundError"
    assert "huggingface_hub.errors.EntryNotFoundError" in out["error"]
    assert not (data_dir / "shard_06542.parquet").exists()
    assert hub.requests[-1][0] == "HEAD"  # nothing was fetched
