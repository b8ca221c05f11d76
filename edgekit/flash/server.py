"""``edgekit serve``: a small HTTP(S) server for a directory of ``*.ekb`` bundles.

Devices download bundles from here with :func:`edgekit_runtime.agent.fetch.fetch_bundle`,
which resumes an interrupted download with a ``Range`` request, so this server
implements single byte ranges as RFC 9110 describes them:

* ``GET /bundles/<sha256>.ekb`` — content-addressed: the sha256 of the file's bytes
  (what an ``install`` command pins). ``GET /bundles/<filename>.ekb`` serves by name.
* ``GET /index.json`` — ``[{"name", "sha256", "size"}, ...]`` sorted by name.
* ``HEAD`` on the same paths; any other method is 405, any other path 404.

Only names found by listing ``root`` are served, so no request path can reach a
file outside it. ``ETag`` is ``"<sha256>"`` (strong), which ``If-Range`` is compared
with. A single range (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) answers 206; a
range that starts past the end answers 416; several ranges or a malformed header
are ignored and the whole file is sent with 200, which the RFC allows.

Hashes are computed once per (path, size, mtime) and cached, so replacing a file
in ``root`` is picked up on the next request.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import re
import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from edgekit.errors import EdgekitError
from edgekit_runtime.fileio import sha256_file  # the same digest devices check downloads against

log = logging.getLogger("edgekit.flash.server")

CHUNK = 64 * 1024
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class BundleFile:
    """One ``*.ekb`` in the served directory."""

    name: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class ServedRequest:
    """One answered request, kept in :attr:`BundleServer.requests` (most recent last)."""

    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int  # body bytes actually written (less than promised if the client went away)


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """Interpret a ``Range`` header for a representation of ``size`` bytes.

    Returns ``(first, last)`` (inclusive) for one satisfiable range, ``"unsatisfiable"``
    (answer 416), or ``None``: no header, another unit, several ranges or a
    malformed value — all answered with the whole file (RFC 9110 §14.2).
    """
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip().replace(" ", ""))
    if match is None:  # other unit, a list of ranges, garbage
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        if last and int(last) < start:
            return None  # invalid range-spec: ignore the header
        if start >= size:
            return "unsatisfiable"
        end = min(int(last), size - 1) if last else size - 1
        return start, end
    if not last:
        return None  # "bytes=-"
    suffix = int(last)
    if suffix == 0 or size == 0:
        return "unsatisfiable"
    return max(0, size - suffix), size - 1


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # a wave of devices connects at once; socketserver's default backlog (5) makes the rest
    # wait out a TCP SYN retry (~1 s each)
    request_queue_size = 1024
    allow_reuse_address = True  # SO_REUSEADDR: a restart need not wait out TIME_WAIT; a live listener still blocks

    def __init__(self, address, handler, bundle_server: "BundleServer", ssl_context: ssl.SSLContext | None):
        self.bundle_server = bundle_server
        self.ssl_context = ssl_context
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def finish_request(self, request, client_address):
        # TLS handshake in the connection's own thread, so a slow client cannot stall accept().
        if self.ssl_context is not None:
            request.settimeout(_Handler.timeout)
            request = self.ssl_context.wrap_socket(request, server_side=True)
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        log.debug("connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
    server_version = "edgekit-serve"
    timeout = 60  # idle keep-alive connections are closed after this

    server: _HTTPServer

    # -- plumbing
    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("%s %s", self.address_string(), format % args)

    def __getattr__(self, name: str):
        # every method other than GET/HEAD is 405, not http.server's 501
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        self.close_connection = True  # a request body we did not read must not be taken for the next request
        self._send_small(405, b"method not allowed: use GET or HEAD\n", {"Allow": "GET, HEAD"})

    def _record(self, status: int, body_bytes: int) -> None:
        self.server.bundle_server._record(
            ServedRequest(self.command, self.path, self.headers.get("Range"), status, body_bytes))

    def _send_small(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                    content_type: str = "text/plain; charset=utf-8") -> None:
        # recorded before anything leaves, so the record of a request precedes the client's next request
        self._record(status, 0 if self.command == "HEAD" else len(body))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- routes
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/index.json":
            body = json.dumps(self.server.bundle_server.index(), indent=1).encode() + b"\n"
            self._send_small(200, body, {"Cache-Control": "no-cache"}, content_type="application/json")
            return
        if path.startswith("/bundles/"):
            bundle = self.server.bundle_server._lookup(unquote(path[len("/bundles/"):]))
            if bundle is not None:
                self._send_bundle(bundle)
                return
        self._send_small(404, b"not found: GET /index.json lists the bundles served here\n")

    def _send_bundle(self, bundle: BundleFile) -> None:
        try:
            f = open(bundle.path, "rb")
        except OSError:  # removed since the listing
            self._send_small(404, b"not found\n")
            return
        with f:
            size, sha = bundle.size, bundle.sha256
            if os.fstat(f.fileno()).st_size != size:  # replaced since the listing: describe what we send
                size, sha = os.fstat(f.fileno()).st_size, self.server.bundle_server._sha256(bundle.path)
            etag = f'"{sha}"'
            span = parse_range(self.headers.get("Range"), size) if self.command == "GET" else None
            if_range = self.headers.get("If-Range")
            if span is not None and if_range is not None and if_range.strip() != etag:
                span = None  # the client's partial copy is of another version: send it all
            headers = {"Accept-Ranges": "bytes", "ETag": etag}
            if span == "unsatisfiable":
                headers["Content-Range"] = f"bytes */{size}"
                self._send_small(416, b"range not satisfiable\n", headers)
                return
            if span is None:
                status, start, length = 200, 0, size
            else:
                status, start, length = 206, span[0], span[1] - span[0] + 1
                headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            written = 0
            if self.command == "GET":
                try:
                    written = self._stream(f, start, length)
                finally:
                    self._record(status, written)
            else:
                self._record(status, 0)

    def _stream(self, f, start: int, length: int) -> int:
        """Copy ``length`` bytes from ``start``; throttled to ``rate_limit_bps`` when set."""
        owner = self.server.bundle_server
        rate = owner.rate_limit_bps
        chunk = min(CHUNK, max(1, rate // 20)) if rate else CHUNK  # ~20 writes/s keeps the pacing smooth
        f.seek(start)
        written, began = 0, time.monotonic()
        try:
            while written < length:
                if owner._stopping.is_set():
                    self.close_connection = True
                    break
                data = f.read(min(chunk, length - written))
                if not data:  # the file shrank under us: the client sees a short body and retries
                    self.close_connection = True
                    break
                self.wfile.write(data)
                written += len(data)
                owner._count_bytes(len(data))
                if rate:
                    ahead = written / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ssl.SSLError) as exc:
            log.debug("client %s went away after %d bytes: %s", self.address_string(), written, exc)
            self.close_connection = True
        return written


class BundleServer:
    """Serve the ``*.ekb`` files of ``root`` over HTTP (HTTPS when ``tls_cert``/``tls_key`` are given).

    Usage::

        with BundleServer(Path("bundles"), host="0.0.0.0", port=8000) as server:
            info = server.add(Path("dist/digits.ekb"))   # {"url", "sha256", "size", "name"}
            ...                                           # send info["url"] + info["sha256"] to devices

    ``port=0`` picks a free port (see :attr:`url` once started). ``rate_limit_bps``
    caps each connection's body rate (bytes/s). :attr:`bytes_sent` counts body bytes
    and :attr:`requests` keeps the last 1000 answered requests.
    """

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0, *, tls_cert: Path | None = None,
                 tls_key: Path | None = None, rate_limit_bps: int | None = None,
                 advertise_host: str | None = None):
        root = Path(root)
        if not root.is_dir():
            raise EdgekitError(f"cannot serve bundles from {root}: not a directory. "
                               f"Create it (mkdir -p {root}) or point to the folder that holds your *.ekb files.")
        if (tls_cert is None) != (tls_key is None):
            raise EdgekitError("HTTPS needs both a certificate and its private key (--tls-cert and --tls-key).")
        if rate_limit_bps is not None and rate_limit_bps <= 0:
            raise EdgekitError(f"rate limit must be a positive number of bytes per second, not {rate_limit_bps}.")
        self.root = root
        self.host = host
        self.port = port
        self.tls_cert = Path(tls_cert) if tls_cert else None
        self.tls_key = Path(tls_key) if tls_key else None
        self.rate_limit_bps = rate_limit_bps
        self.advertise_host = advertise_host
        self.requests: collections.deque[ServedRequest] = collections.deque(maxlen=1000)
        self.bytes_sent = 0
        self._stats_lock = threading.Lock()
        self._hash_cache: dict[Path, tuple[int, int, str]] = {}
        self._hash_lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle
    def start(self) -> "BundleServer":
        """Bind and serve from a background thread; returns ``self``."""
        if self._httpd is not None:
            return self
        context = None
        if self.tls_cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise EdgekitError(f"cannot load the TLS certificate {self.tls_cert} / key {self.tls_key}: {exc}. "
                                   "Give a PEM certificate and its matching unencrypted PEM key.") from exc
        try:
            self._httpd = _HTTPServer((self.host, self.port), _Handler, self, context)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EdgekitError(f"port {self.port} on {self.host} is already in use. Stop the other server, "
                                   "choose another port (--port), or use --port 0 to pick a free one.") from exc
            if exc.errno == errno.EACCES:
                raise EdgekitError(f"not allowed to listen on port {self.port}: ports below 1024 need root. "
                                   "Choose a port above 1024 (--port 8000).") from exc
            raise EdgekitError(f"cannot listen on {self.host}:{self.port}: {exc}. "
                               "Check the --host address belongs to this machine.") from exc
        self.port = self._httpd.server_address[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"edgekit-serve:{self.port}", daemon=True)
        self._thread.start()
        log.info("serving %s at %s", self.root, self.url)
        return self

    def stop(self) -> None:
        """Stop accepting connections and abort downloads in progress."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> "BundleServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Start if needed and block until interrupted (Ctrl-C) — what ``edgekit serve`` runs."""
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(timeout=0.5)
        finally:
            self.stop()

    # -- addresses
    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000`` (the real port once started with ``port=0``)."""
        if self.port == 0:
            raise EdgekitError("the server has no port yet: call start() first (port=0 picks one when binding).")
        host = self.advertise_host or self.host
        if host in _WILDCARD_HOSTS:
            host = _primary_address()
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{host}:{self.port}"

    def url_for(self, path_or_sha: str | Path) -> str:
        """The content-addressed URL of a bundle given its sha256 or its path (hashed if needed).

        The bundle must be in ``root`` to be served: :meth:`add` puts it there. Needs
        the real port, so call it after :meth:`start` when ``port=0``.
        """
        text = str(path_or_sha)
        sha = text if _SHA_RE.fullmatch(text) else None
        if sha is None:
            path = Path(path_or_sha)
            if not path.is_file():
                raise EdgekitError(f"{path} is neither a sha256 (64 lowercase hex digits) nor an existing file.")
            sha = self._sha256(path)
        return f"{self.url}/bundles/{sha}.ekb"

    # -- content
    def add(self, bundle_path: Path) -> dict:
        """Make ``bundle_path`` servable: copy it into ``root`` unless it is already there.

        A different file of the same name in ``root`` is kept; the new one is then
        stored as ``<stem>-<sha256[:12]>.ekb``. Returns ``{"url", "sha256", "size", "name"}``
        where ``url`` is content-addressed (what an install command pins).
        """
        src = Path(bundle_path)
        if not src.is_file():
            raise EdgekitError(f"no bundle at {src}: build one with `edgekit build` or check the path.")
        sha = self._sha256(src)
        size = src.stat().st_size
        if src.resolve().parent == self.root.resolve() and src.suffix == ".ekb":
            name = src.name
        else:
            name = src.name if src.suffix == ".ekb" else f"{src.name}.ekb"
            target = self.root / name
            if target.exists() and not (target.is_file() and self._sha256(target) == sha):
                name = f"{Path(name).stem}-{sha[:12]}.ekb"
                target = self.root / name
            if not target.exists():
                _place(src, target)
        return {"url": self.url_for(sha), "sha256": sha, "size": size, "name": name}

    def bundles(self) -> list[BundleFile]:
        """The ``*.ekb`` regular files directly in ``root``, sorted by name, with their sha256."""
        found = []
        for path in self._listing():
            try:
                found.append(self._describe(path))
            except OSError:  # vanished since the listing
                continue
        return found

    def index(self) -> list[dict]:
        """What ``GET /index.json`` returns."""
        return [{"name": b.name, "sha256": b.sha256, "size": b.size} for b in self.bundles()]

    def _listing(self) -> list[Path]:
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError:
            return []
        paths = []
        for entry in entries:
            try:
                if entry.name.endswith(".ekb") and not entry.name.startswith(".") and entry.is_file():
                    paths.append(Path(entry.path))
            except OSError:
                continue
        return paths

    def _describe(self, path: Path) -> BundleFile:
        return BundleFile(path.name, path, path.stat().st_size, self._sha256(path))

    def _lookup(self, name: str) -> BundleFile | None:
        """The bundle a request names: by content hash first, then by file name; only listed files qualify."""
        if "/" in name or "\\" in name or not name.endswith(".ekb"):
            return None
        stem = name[: -len(".ekb")]
        if _SHA_RE.fullmatch(stem):
            for bundle in self.bundles():
                if bundle.sha256 == stem:
                    return bundle
        for path in self._listing():
            if path.name == name:
                try:
                    return self._describe(path)
                except OSError:
                    return None
        return None

    def _sha256(self, path: Path) -> str:
        st = path.stat()
        key = path.resolve()
        with self._hash_lock:
            cached = self._hash_cache.get(key)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        sha = sha256_file(path)  # outside the lock: other requests need not wait for a big file
        with self._hash_lock:
            self._hash_cache[key] = (st.st_size, st.st_mtime_ns, sha)
        return sha

    def _record(self, request: ServedRequest) -> None:
        with self._stats_lock:
            self.requests.append(request)
        log.info("%s %s%s -> %d (%d bytes)", request.method, request.path,
                 f" [{request.range}]" if request.range else "", request.status, request.body_bytes)

    def _count_bytes(self, n: int) -> None:
        with self._stats_lock:
            self.bytes_sent += n


def _place(src: Path, target: Path) -> None:
    """Copy under a temporary name, then rename, so a half-copied file is never served.

    Not a hardlink: a tool that rewrites the source in place (``cp new.ekb dist/model.ekb``)
    would change the served bundle under devices that pinned its old sha256.
    """
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _primary_address() -> str:
    """The address other machines most likely reach us at (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return socket.gethostname()
