"""
The default dataset from the Hugging Face hub: the validation shard and the first training shards, in parallel,
each renamed into place only when complete and checked before its record is written. A watchdog ends a transfer
that stalls, and an unreachable hub fails in seconds, in one line.
"""

import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from harness.datasets import DATASET_REPO, MAX_SHARD, TEST_FILENAME, VAL_FILENAME, check_shard, read_source, shard_name
from harness.errors import HarnessError
from harness.records import claim, read_record, record_path, write_record


def network_hint(repo=DATASET_REPO):
    from huggingface_hub import constants
    return (f"cannot download {repo} from {constants.ENDPOINT}: check the network, set HF_ENDPOINT to a "
            f"reachable mirror (and HF_TOKEN if it needs one), or use local parquet files with "
            f"`uv run prepare.py --source DIR`")


def connect_error(endpoint, timeout):
    """Why one TCP connection to the endpoint fails (seconds, where the hub client retries for a minute), or None."""
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return str(e)
    return None


def check_reachable(repo=DATASET_REPO):
    """Fail in seconds, not after the hub client's minute of retries, when the endpoint cannot be reached."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise HarnessError(f"{network_hint(repo)} (HF_HUB_OFFLINE is set and shards are missing)")
    error = connect_error(constants.ENDPOINT, timeout=5.0)
    if error:
        raise HarnessError(f"{network_hint(repo)} ({error})")


# A transfer that receives less than STALL_BYTES in STALL_SECONDS fails (the hub client alone waits ~6.5 minutes
# for a hub that never answers, and forever for one that trickles); with output that is not a terminal, a progress
# line every PROGRESS_SECONDS. The variables exist for the tests.
STALL_SECONDS = float(os.environ.get("AUTORESEARCH_STALL_SECONDS") or 60)
STALL_BYTES = 1 << 20
PROGRESS_SECONDS = float(os.environ.get("AUTORESEARCH_PROGRESS_SECONDS") or 30)


class Transfers:
    """What each download thread is fetching and when it last made progress; bytes and shards done in all."""

    def __init__(self, total):
        self.lock, self.active, self.total = threading.Lock(), {}, total
        self.done = self.bytes = 0
        self.t0 = time.monotonic()

    def start(self, name):
        with self.lock:
            self.active[threading.get_ident()] = [name, time.monotonic(), 0]

    def finish(self, ok):
        with self.lock:
            self.active.pop(threading.get_ident(), None)
            self.done += ok

    def received(self, n):
        with self.lock:
            self.bytes += n
            transfer = self.active.get(threading.get_ident())
            if transfer is not None:
                transfer[2] += n
                if transfer[2] >= STALL_BYTES:   # progress: the clock starts again
                    transfer[1:] = [time.monotonic(), 0]

    def watch(self, stop, show_progress):
        """Until `stop` is set: a progress line when due; the process ends in one line if a transfer stalls."""
        last_line = time.monotonic()
        while not stop.wait(min(1.0, PROGRESS_SECONDS, STALL_SECONDS)):
            now = time.monotonic()
            if show_progress and now - last_line >= PROGRESS_SECONDS:
                mb = self.bytes / 1e6
                print(f"downloading: {self.done}/{self.total} shards, {mb:.1f} MB, {mb / (now - self.t0):.2f} MB/s",
                      flush=True)
                last_line = now
            with self.lock:
                stalled = [name for name, since, _ in self.active.values() if now - since >= STALL_SECONDS]
            if stalled:
                print(f"prepare.py: downloading {stalled[0]} made no progress for {STALL_SECONDS:.0f}s (less than "
                      f"{STALL_BYTES >> 20} MiB): check the network (or HF_ENDPOINT) and run the same command "
                      f"again; complete shards are kept", file=sys.stderr, flush=True)
                os._exit(1)   # the stalled thread cannot be interrupted; nothing half-written is ever trusted


def _count_bytes(transfers):
    """Have the hub client's HTTP session report every byte it receives to `transfers`."""
    import httpx2
    from huggingface_hub import get_session

    class Counted(httpx2.SyncByteStream):
        def __init__(self, stream):
            self.stream = stream

        def __iter__(self):
            for chunk in self.stream:
                transfers.received(len(chunk))
                yield chunk

        def close(self):
            self.stream.close()

    def hook(response):
        response.stream = Counted(response.stream)

    session = get_session()
    hooks = session.event_hooks
    hooks["response"] = [*hooks.get("response", []), hook]
    session.event_hooks = hooks


def _download_shard(name, data_dir, transfers):
    """Fetch one shard with the hub client, which renames the file into place only when it is complete."""
    transfers.start(name)
    ok = False
    try:
        _fetch_shard(name, data_dir)
        ok = True
    finally:
        transfers.finish(ok)


def _fetch_shard(name, data_dir):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError
    path = data_dir / name
    for _ in range(2):
        try:
            hf_hub_download(DATASET_REPO, name, repo_type="dataset", revision="main", local_dir=data_dir)
        except RemoteEntryNotFoundError:
            raise HarnessError(f"{DATASET_REPO} has no file {name} (is --num-shards too large?)") from None
        except LocalEntryNotFoundError as e:   # the client's word for "could not reach the hub", or HF_HUB_OFFLINE
            raise HarnessError(f"{network_hint()} ({name}: {e.__cause__ or e})") from None
        except Exception as e:   # a transfer cut short: nothing is left under the final name
            raise HarnessError(f"downloading {name} failed ({type(e).__name__}: {e}): run the same command "
                               f"again to fetch what is missing") from None
        try:
            check_shard(path)
            write_record(path, {"repo": DATASET_REPO, "file": name})
            return path
        except HarnessError:
            path.unlink(missing_ok=True)   # a corrupt file: fetch it once more from scratch
    raise HarnessError(f"downloaded {name} twice and it is still not a valid parquet file; try again later")


def download_data(num_shards, workers, data_dir):
    """Download the validation and test shards and the first `num_shards` training shards (-1: all of the
    MAX_SHARD - 1 before the test shard). Returns (fetched, present)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")   # read when huggingface_hub is first imported
    from huggingface_hub.utils import disable_progress_bars
    from tqdm import tqdm
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for orphan in (data_dir / ".cache" / "huggingface" / "download").glob("*.incomplete"):
        orphan.unlink()   # left by a killed download; the hub client never resumes these
    n_train = MAX_SHARD - 1 if num_shards < 0 else min(num_shards, MAX_SHARD - 1)
    wanted = [VAL_FILENAME, TEST_FILENAME] + [shard_name(i) for i in range(n_train)]
    ours = read_source(data_dir).get("dataset") == DATASET_REPO   # else claim deletes what is there
    missing = []
    for name in wanted:
        path = data_dir / name
        if ours and read_record(path, {"repo": DATASET_REPO, "file": name}):
            continue
        if ours and record_path(path).exists():
            path.unlink(missing_ok=True)   # not what was downloaded: fetch it again
        missing.append(name)
    if missing:
        check_reachable()   # before claim: no network, nothing deleted
    claim(data_dir, DATASET_REPO)
    if not missing:
        return 0, len(wanted)
    disable_progress_bars()
    transfers, stop = Transfers(len(missing)), threading.Event()
    _count_bytes(transfers)
    watchdog = threading.Thread(target=transfers.watch, args=(stop, not sys.stdout.isatty()), daemon=True)
    watchdog.start()
    try:
        with tqdm(total=len(missing), desc="downloading shards", unit="shard", disable=None) as bar:   # a terminal's
            _download_shard(missing[0], data_dir, transfers)   # one first, so that a dead network fails fast, once
            bar.update()
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for _ in pool.map(lambda n: _download_shard(n, data_dir, transfers), missing[1:]):
                    bar.update()
    finally:
        stop.set()
    return len(missing), len(wanted) - len(missing)

