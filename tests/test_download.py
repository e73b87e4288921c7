"""`uv run prepare.py` downloading with the real hub client from a fake hub on 127.0.0.1 (tests/hf_server.py)."""

import os
import socket

import pytest
import torch

from conftest import fails_in_one_line, make_corpus, run_prepare
from hf_server import serve


def hub_env(hub_url, home, **extra):
    """The environment a user would have, pointed at the fake hub; nothing from ~/.cache or the internet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "AUTORESEARCH_"))}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(home), HF_HUB_DISABLE_XET="1",
               HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """What the hub serves: training shards shard_00000..00002 and the validation shard."""
    return make_corpus(tmp_path_factory.mktemp("remote"), n_train_shards=3, docs_per_shard=400)


def prepare(cache, env, *args, timeout=300):
    return run_prepare(cache, "--num-shards", "2", *args, env=env, timeout=timeout)


@pytest.mark.slow
def test_download_builds_the_cache_and_a_rerun_fetches_nothing(tmp_path, remote):
    with serve(remote) as hub:
        env = hub_env(hub.url, tmp_path / "hf")
        first = prepare(tmp_path / "cache", env)
        assert first.returncode == 0, first.stderr
        data = tmp_path / "cache" / "data"
        assert sorted(p.name for p in data.glob("*.parquet")) == [
            "shard_00000.parquet", "shard_00001.parquet", "shard_06541.parquet",   # --num-shards 2, test and
            "shard_06542.parquet"]                                                 # validation
        for p in data.glob("*.parquet"):
            assert p.read_bytes() == (remote / p.name).read_bytes()
        assert "4 shards downloaded" in first.stdout and "trained 8192 tokens" in first.stdout
        # what to run next, on this machine: the smoke run where there is no CUDA GPU for `uv run train.py`
        next_step = "now run `uv run train.py`" if torch.cuda.is_available() else "run `uv run prepare.py --smoke`"
        assert next_step in first.stdout.splitlines()[-1]
        gets = hub.count("GET", "shard_00000.parquet")
        second = prepare(tmp_path / "cache", env)
        assert second.returncode == 0, second.stderr
        assert "0 shards downloaded, 4 already present" in second.stdout
        assert hub.count("GET", "shard_00000.parquet") == gets


@pytest.mark.slow
def test_connection_cut_mid_file_leaves_nothing_and_a_rerun_repairs_it(tmp_path, remote):
    with serve(remote) as hub:
        env = hub_env(hub.url, tmp_path / "hf")
        hub.cut("shard_00001.parquet", after_bytes=100_000, times=1, mode="reset")
        first = prepare(tmp_path / "cache", env)
        fails_in_one_line(first, "downloading shard_00001.parquet failed", "again")
        data = tmp_path / "cache" / "data"
        assert not (data / "shard_00001.parquet").exists()   # no half-written file under the final name
        assert not (tmp_path / "cache" / "tokenizer").exists()
        second = prepare(tmp_path / "cache", env)
        assert second.returncode == 0, second.stderr
        assert (data / "shard_00001.parquet").read_bytes() == (remote / "shard_00001.parquet").read_bytes()
        assert not list(data.rglob("*.incomplete"))


def test_corrupt_file_on_the_hub_is_refused(tmp_path, remote):
    served = tmp_path / "served"
    served.mkdir()
    for p in remote.iterdir():
        (served / p.name).write_bytes(p.read_bytes())
    (served / "shard_00001.parquet").write_bytes(b"not a parquet file at all" * 100)
    with serve(served) as hub:
        result = prepare(tmp_path / "cache", hub_env(hub.url, tmp_path / "hf"))
    fails_in_one_line(result, "shard_00001.parquet twice and it is still not a valid parquet file")
    assert not (tmp_path / "cache" / "data" / "shard_00001.parquet").exists()


def test_missing_file_on_the_hub_names_num_shards(tmp_path, remote):
    with serve(remote) as hub:
        result = run_prepare(tmp_path / "cache", "--num-shards", "5", env=hub_env(hub.url, tmp_path / "hf"))
    fails_in_one_line(result, "has no file shard_00003.parquet (is --num-shards too large?)")


@pytest.mark.parametrize("n", ["-5", "-2", "0"])
def test_num_shards_is_a_count_or_minus_one_for_all_else_refused_up_front(tmp_path, remote, n):
    with serve(remote) as hub:
        result = run_prepare(tmp_path / "cache", "--num-shards", n, env=hub_env(hub.url, tmp_path / "hf"))
        assert hub.requests == []   # not all 6,542 shards (-5), not the validation shard alone (0)
    fails_in_one_line(result, f"--num-shards {n}: give 1 to 6541 training shards, or -1 for all of them")
    assert not (tmp_path / "cache").exists()


def test_unreachable_endpoint_fails_fast_naming_the_ways_out(tmp_path):
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = prepare(tmp_path / "cache", hub_env(f"http://127.0.0.1:{port}", tmp_path / "hf"))
    line = fails_in_one_line(result, "HF_ENDPOINT", "--source", "Connection refused")
    # Fast, shown without timing it: the line comes from prepare.py's own connection attempt, before any shard is
    # requested (a failed request would name its shard), and the one line on stderr holds none of the warnings
    # the hub client prints for each of its retries (~24 s of them)
    assert "shard_" not in line
    assert not (tmp_path / "cache" / "tokenizer").exists()


def test_offline_mode_with_missing_shards_says_so(tmp_path, remote):
    with serve(remote) as hub:
        result = prepare(tmp_path / "cache", hub_env(hub.url, tmp_path / "hf", HF_HUB_OFFLINE="1"))
        assert hub.requests == []
    fails_in_one_line(result, "HF_HUB_OFFLINE", "--source")


@pytest.mark.slow
def test_a_hub_that_never_answers_fails_in_bounded_time_with_one_line(tmp_path, remote):
    with serve(remote) as hub:
        hub.silent = True   # accepts the connection, reads the request, says nothing
        env = hub_env(hub.url, tmp_path / "hf", AUTORESEARCH_STALL_SECONDS="1")
        result = prepare(tmp_path / "cache", env, timeout=120)   # an upper bound for a hang, not a measurement
        assert hub.requests   # it did get the request
    fails_in_one_line(result, "made no progress for 1s", "run the same command again")


@pytest.mark.slow
def test_a_trickling_download_fails_with_one_line_and_progress_is_printed(tmp_path, remote):
    with serve(remote) as hub:
        hub.cut("shard_06542.parquet", after_bytes=1000, times=1, mode="trickle")   # the first shard fetched
        # a progress line is due after 1 s; the watchdog checks progress before stalls, so it is printed first
        env = hub_env(hub.url, tmp_path / "hf", AUTORESEARCH_STALL_SECONDS="2", AUTORESEARCH_PROGRESS_SECONDS="1")
        result = prepare(tmp_path / "cache", env, timeout=120)   # output to a pipe, not a terminal
    fails_in_one_line(result, "downloading shard_06542.parquet made no progress for 2s")
    progress = [line for line in result.stdout.splitlines() if line.startswith("downloading: ")]
    assert progress and all(" shards, " in line and " MB, " in line and line.endswith(" MB/s") for line in progress)
    assert not (tmp_path / "cache" / "data" / "shard_06542.parquet").exists()
