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
"""

import contextlib
import hashlib
import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

RESOLVE = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
CDN = re.compile(r"^/cdn/(?P<file>.+)$")


class FakeHub:
    def __init__(self, root_dir, repo_id):
        self.root, self.repo_id = Path(root_dir), repo_id
        self.commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex string will do as the commit id
        self.requests = []
        self.silent = False  # accept, read the request, never answer (until the server stops)
        self._cuts = {}  # filename -> [after_bytes, times_left, mode]
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # releases silent and trickling handlers at shutdown
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

    return Handler


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
