"""A tiny fake Hugging Face Hub (stdlib only) that the real `huggingface_hub.hf_hub_download` (2.4.0) accepts.

    with serve(root_dir) as hub:      # every file under root_dir is a file of the dataset repo
        env["HF_ENDPOINT"] = hub.url  # huggingface_hub reads it at *import* time: use a subprocess
        hub.cut("shard_00000.parquet", after_bytes=1000, times=1, mode="reset")  # optional fault
        ...
        hub.requests                  # [(method, path, Range header or None), ...] in arrival order
        hub.silent = True             # from now on, accept every connection and never answer

What the client does (huggingface_hub/file_download.py, utils/_http.py):
  1. HEAD {endpoint}/datasets/{repo}/resolve/{revision}/{filename}, following redirects only within the same
     origin. It needs `X-Repo-Commit` and an ETag (`X-Linked-Etag` preferred) and takes the size from
     `X-Linked-Size` or `Content-Length`. A 404 becomes RemoteEntryNotFoundError only with
     `X-Error-Code: EntryNotFound`; without it, the client reports a connection problem instead.
  2. GET of the `Location` of a cross-origin redirect (else of the resolve URL), streamed in 10 MiB chunks into a
     uniquely named `.incomplete` file. If the connection drops, it retries in the same call, sending
     `Range: bytes=N-` where N is the number of bytes in the complete 10 MiB chunks it has written.
Like the real Hub does for LFS files, we answer on /resolve with a 302 to a "CDN" on another origin
(http://localhost:PORT, while the endpoint is http://127.0.0.1:PORT) and send the metadata on the 302 itself.
We never send X-Xet-Hash / X-Xet-Refresh-Route / `Link: <..>; rel="xet-auth"`, so the client uses plain HTTP
even though hf_xet is installed.

Kernel-type repos, for the `kernels` client (0.17.2: kernels/_versions.py, variants.py, resolver.py):

    commit = hub.add_kernel("kernels-community/flash-attn3", fa3_kernel_files(), branches=("main", "v1"))

  1. GET /api/kernels/{repo}/refs: `version=1` looks for the branch v1 and takes its targetCommit.
  2. GET /api/kernels/{repo}/tree/{commit}/build: the build variants (folders); the client picks its own.
  3. HEAD + GET /kernels/{repo}/resolve/{commit}/build/{variant}/metadata.json.
  4. snapshot_download of build/{variant}/*: GET /api/kernels/{repo}/tree/{commit}?recursive=True (the whole
     repo, which the hub client caches as trees/{commit}.json), then HEAD + GET of each file on /resolve.
Small files are answered on /resolve itself with their git blob id as ETag, as the real Hub does for non-LFS files.
"""

import contextlib
import hashlib
import json
import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

RESOLVE = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
CDN = re.compile(r"^/cdn/(?P<file>.+)$")
KERNEL_API = re.compile(r"^/api/kernels/(?P<repo>[^/]+/[^/]+)/(?P<what>refs|tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?)$")
KERNEL_RESOLVE = re.compile(r"^/kernels/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class FakeHub:
    def __init__(self, root_dir, repo_id):
        self.root, self.repo_id = Path(root_dir), repo_id
        self.commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex string will do as the commit id
        self.requests = []
        self.silent = False  # accept, read the request, never answer (until the server stops)
        self._cuts = {}  # filename -> [after_bytes, times_left, mode]
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # releases silent and trickling handlers at shutdown
        self.kernels = {}  # kernel repo id -> {"commits": {sha: {path: bytes}}, "branches": {name: sha}}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{port}"  # for HF_ENDPOINT
        self.cdn_url = f"http://localhost:{port}"  # same server, but a different origin for the client

    def cut(self, filename, after_bytes, times=1, mode="reset"):
        """Break the next `times` GETs of `filename` once file offset `after_bytes` is reached.

        mode="reset": RST -> httpx2.ReadError, which hf_hub_download does NOT retry: the call raises;
        mode="trickle": send the bytes, then the rest 64 bytes every 0.1 s (no read ever times out).
        A GET whose Range starts at or after `after_bytes` is broken before its first body byte."""
        assert mode in ("reset", "trickle")
        with self._lock:
            self._cuts[filename] = [after_bytes, times, mode]

    def _take_cut(self, filename):
        with self._lock:
            cut = self._cuts.get(filename)
            if cut and cut[1] > 0:
                cut[1] -= 1
                return cut[0], cut[2]
        return None

    def add_kernel(self, repo_id, files, branches=("main", "v1")):
        """A new commit of kernel repo `repo_id` holding `files` ({path: bytes}); `branches` move to it."""
        commit = hashlib.sha1(repo_id.encode() + json.dumps(sorted((k, v.hex()) for k, v in files.items())).encode())
        repo = self.kernels.setdefault(repo_id, {"commits": {}, "branches": {}})
        repo["commits"][commit.hexdigest()] = dict(files)
        repo["branches"].update(dict.fromkeys(branches, commit.hexdigest()))
        return commit.hexdigest()

    def count(self, method, filename):
        return sum(1 for m, p, _ in self.requests if m == method and unquote(p).endswith("/" + filename))


def _make_handler(hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def log_message(self, *args):  # no access log on stderr
            pass

        def do_HEAD(self):
            self._serve()

        def do_GET(self):
            self._serve()

        def _head(self, status, headers, length):
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(length)}.items():
                self.send_header(k, v)
            self.end_headers()

        def _reply(self, status, headers, body=b""):
            self._head(status, headers, len(body))
            if self.command == "GET":
                self.wfile.write(body)

        def _error(self, error_code):  # huggingface_hub picks the exception class from X-Error-Code
            self._reply(404, {"X-Error-Code": error_code, "X-Error-Message": error_code,
                              "X-Repo-Commit": hub.commit}, f"{error_code}: {self.path}".encode())

        def _serve(self):
            path = self.path.split("?")[0]
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if hub.silent:
                hub._stopped.wait()
                self.close_connection = True
                return
            if path.startswith(("/api/kernels/", "/kernels/")):
                return self._serve_kernel(unquote(path))
            resolve, cdn = RESOLVE.match(path), CDN.match(path)
            if resolve and resolve["repo"] != hub.repo_id or not (resolve or cdn):
                return self._error("RepoNotFound")
            if resolve and unquote(resolve["rev"]) not in ("main", hub.commit):
                return self._error("RevisionNotFound")
            filename = unquote((resolve or cdn)["file"])
            fpath = hub.root / filename
            if ".." in Path(filename).parts or not fpath.is_file():
                return self._error("EntryNotFound")
            data = fpath.read_bytes()
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'  # for LFS files the ETag is the content's sha256
            if resolve:
                # Cross-origin redirect: the client's HEAD stops here and reads the metadata from this response.
                return self._reply(302, {"Location": f"{hub.cdn_url}/cdn/{resolve['file']}",
                                         "X-Repo-Commit": hub.commit, "X-Linked-Etag": etag,
                                         "X-Linked-Size": str(len(data))})
            headers = {"X-Repo-Commit": hub.commit, "ETag": etag, "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if self.command == "HEAD":
                return self._head(200, headers, len(data))
            start, rng = 0, re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if rng:
                start, end = int(rng[1]), int(rng[2] or len(data) - 1)
                if start >= len(data):
                    return self._reply(416, {"Content-Range": f"bytes */{len(data)}"})
                headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
                data = data[start : end + 1]
            self._head(206 if rng else 200, headers, len(data))  # the length we promise...
            cut = hub._take_cut(filename)
            if cut is None:
                self.wfile.write(data)
                return
            after_bytes, mode = cut
            self.wfile.write(data[: max(0, after_bytes - start)])  # ... but we deliver less
            if mode == "trickle":
                for i in range(max(0, after_bytes - start), len(data), 64):
                    if hub._stopped.wait(0.1):
                        break
                    with contextlib.suppress(OSError):
                        self.wfile.write(data[i : i + 64])
                        self.wfile.flush()
                return
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may be gone already
                # SO_LINGER with timeout 0 makes close() send RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()

        def _serve_kernel(self, path):
            api, resolve = KERNEL_API.match(path), KERNEL_RESOLVE.match(path)
            repo = hub.kernels.get((api or resolve)["repo"]) if api or resolve else None
            if repo is None:
                return self._error("RepoNotFound")
            if api and api["what"] == "refs":
                branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                            for name, sha in repo["branches"].items()]
                return self._json({"branches": branches, "converts": [], "tags": []})
            rev = (api or resolve)["rev"]
            commit = repo["branches"].get(rev, rev)
            files = repo["commits"].get(commit)
            if files is None:
                return self._error("RevisionNotFound")
            if resolve:
                data = files.get(resolve["file"])
                if data is None:
                    return self._error("EntryNotFound")
                etag = f'"{_blob_id(data)}"'
                return self._reply(200, {"X-Repo-Commit": commit, "ETag": etag,
                                         "Content-Type": "application/octet-stream"}, data)
            prefix = (api["path"] or "").strip("/")
            under = [f for f in files if not prefix or f.startswith(prefix + "/")]
            if prefix and not under:
                return self._error("EntryNotFound")
            recursive = "recursive=true" in self.path.lower()
            entries, folders = [], set()
            for name in sorted(under):
                rest = name[len(prefix) + 1:] if prefix else name
                parts = rest.split("/")
                for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                    folders.add("/".join(filter(None, [prefix, *parts[:i]])))
                if recursive or len(parts) == 1:
                    data = files[name]
                    entries.append({"type": "file", "path": name, "size": len(data), "oid": _blob_id(data)})
            entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in folders]
            return self._json(entries)

        def _json(self, value):
            self._reply(200, {"Content-Type": "application/json"}, json.dumps(value).encode())

    return Handler


def _blob_id(data):
    """git's id of a blob, the Hub's ETag for a file not stored in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# A Python-only (torch-universal) kernel with Flash Attention 3's interface: flash_attn_func(q, k, v, causal=...,
# window_size=(left, right)) on (B, T, H, D), returning (out, softmax_lse). SDPA with an explicit mask inside.
# `broken`: "backward" (the right output, wrong gradients) or "compile" (right in eager mode, but under
# torch.compile it calls a custom op with no fake implementation, as a compiled kernel without one does).
FA3_INTERFACE = """\
import torch
import torch.nn.functional as F

BROKEN = {broken!r}


def _attend(q, k, v, left):
    T = q.size(1)
    i = torch.arange(T, device=q.device)
    keep = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] <= left) | (left < 0))
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=keep)
    return y.transpose(1, 2)


if BROKEN == "compile":   # a compiled kernel's op registered without a fake (meta) implementation
    @torch.library.custom_op("fake_fa3::attend", mutates_args=())
    def _opaque(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int) -> torch.Tensor:
        return _attend(q, k, v, left).contiguous()


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    assert causal and window_size[1] == 0, "the harness calls FA3 causal, window_size=(w, 0)"
    if BROKEN == "compile" and torch.compiler.is_compiling():
        out = _opaque(q, k, v, window_size[0])
    else:
        out = _attend(q, k, v, window_size[0])
    if BROKEN == "backward":   # the right output, wrong gradients
        out = out.detach() + (v - v.detach())
    lse = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
    return out, lse
"""


def fa3_kernel_files(broken=None, name="flash-attn3"):
    """The files of a kernel-type FA3 repo: the torch-universal build this machine loads, a CUDA build for another
    torch that it must not pick, and the repo's top-level files."""
    python_name = name.replace("-", "_")
    universal, other = "build/torch-universal", "build/torch27-cxx11-cu126-x86_64-linux"
    meta = lambda backend: json.dumps({"id": f"_{python_name}_fake", "name": name, "version": 1,
                                       "license": "BSD-3-Clause", "python-depends": [],
                                       "backend": {"type": backend}}).encode()
    return {"README.md": b"# a fake Flash Attention 3 for the tests\n", "build.toml": b"[general]\n",
            f"{universal}/metadata.json": meta("cpu"),
            f"{universal}/{python_name}/__init__.py": b"from . import flash_attn_interface\n"
                                                     b"from .flash_attn_interface import flash_attn_func\n",
            f"{universal}/{python_name}/flash_attn_interface.py": FA3_INTERFACE.format(broken=broken).encode(),
            f"{other}/metadata.json": meta("cuda"),
            f"{other}/{python_name}/__init__.py": b"raise ImportError('the CUDA build was loaded on the CPU')\n"}


@contextlib.contextmanager
def serve(root_dir, repo_id="karpathy/climbmix-400b-shuffle"):
    """Serve root_dir as dataset `repo_id` on 127.0.0.1:<ephemeral port>; yields the FakeHub."""
    hub = FakeHub(root_dir, repo_id)
    thread = threading.Thread(target=hub._httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub._stopped.set()
        hub._httpd.shutdown()
        hub._httpd.server_close()
        thread.join()
