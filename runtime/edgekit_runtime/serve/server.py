"""``edgekit-runtime serve``: bundles behind an HTTP endpoint that speaks KServe v2.

Built on the standard library's threading HTTP server (HTTP/1.1 keep-alive, one thread per
connection): a device gets no new dependency, and the work that matters runs outside the GIL
(image decoding in OpenCV, inference in the engine). Each route has one batching thread
(:mod:`.batcher`); handler threads decode and pre-process their own request, queue it, wait,
and post-process their own rows.

Endpoints::

    GET  /v2/health/live | /v2/health/ready          (no token needed: for probes)
    GET  /v2                                         server metadata
    GET  /v2/models/NAME[/versions/V]                model metadata (inputs, outputs, version)
    GET  /v2/models/NAME[/versions/V]/ready
    GET  /v2/models/NAME/shadow                      the shadow candidate's agreement and latency (--shadow)
    POST /v2/models/NAME[/versions/V]/infer          KServe v2 JSON, or JSON + binary tensors;
                                                     or a bare image (Content-Type: image/*)
    GET  /metrics                                    Prometheus text

An image is a ``BYTES`` input (any name; one encoded image per element), or the whole body with
``Content-Type: image/jpeg`` (or another ``image/*``): it is decoded, pre-processed as the
bundle's manifest says, and the response carries, beside the model's raw outputs, a ``results``
output (``BYTES``, one JSON document per image: top-k labels, boxes on the original image, or a
segmentation's classes and PNG mask); the raw outputs come too when the request names them. Numeric inputs go to the engine as they are, or through the
manifest's pre-processing when the request's parameters say ``"preprocess": true``.

Every response says which model answered: ``model_version`` in the body and the
``Edgekit-Model-Version`` header (with ``Edgekit-Model-Slot`` when it follows an agent's slots).
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import select
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..contract.errors import ErrorCode, InputError, RuntimeConfigError, RuntimeErrorBase
from ..processing import ImageMeta, cv2_module
from .batcher import Batcher, Pending
from .metrics import ServeMetrics
from .models import Loaded, Route
from .protocol import HEADER_LENGTH, InferRequest, ProtocolError, encode_response, error_body, parse_request

log = logging.getLogger("edgekit_runtime.serve")

_MODEL_PATH = re.compile(
    r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer|/shadow)?$")


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_delay_ms: float = 2.0
    batch_delay: str = "arriving"  # "arriving": wait only for requests being received; "fixed": always (Triton's)
    max_queue: int = 64
    timeout_ms: float = 10_000.0  # a request's deadline unless it gives its own (parameters.timeout, µs)
    max_body_mb: float = 32.0
    token: str | None = None  # bearer token every endpoint but the health probes asks for
    tls_cert: Path | None = None
    tls_key: Path | None = None
    check_every_s: float = 0.5  # how often a state directory's slot pointer is read
    capture: Any = None  # CaptureSettings: keep sampled image requests with their results (off: None)
    shadow_report: Path | None = None  # write the shadow candidates' reports here every 10 s
    report_dir: Path | None = None  # write serve-ROUTE.json here every 10 s (the agent's reports_dir)
    idle_timeout_s: float = 120.0  # keep-alive connections idle this long are closed

    def check(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1:
            raise RuntimeConfigError("--max-batch and --max-queue must be at least 1")
        if self.max_delay_ms < 0 or self.timeout_ms <= 0 or self.max_body_mb <= 0:
            raise RuntimeConfigError("--max-delay-ms must be >= 0, --timeout-ms and --max-body-mb > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise RuntimeConfigError("TLS needs both --tls-cert and --tls-key")


def status_of(exc: RuntimeErrorBase) -> int:
    """The HTTP status a runtime error answers with."""
    if isinstance(exc, ProtocolError):
        return exc.status
    code = exc.code
    if code == ErrorCode.SERVE_NOT_READY or code == ErrorCode.ENGINE_UNAVAILABLE:
        return 503
    if code == ErrorCode.SERVE_MODEL_NOT_FOUND:
        return 404
    if 300 <= int(code) < 400 or code in (ErrorCode.SERVE_BAD_REQUEST, ErrorCode.CONFIG_INVALID):
        return 400
    return 500


class Server:
    """Routes (model name → :class:`Route` and its :class:`Batcher`) behind one HTTP listener."""

    def __init__(self, routes: list[Route], settings: ServeSettings):
        settings.check()
        self.settings = settings
        self.metrics = ServeMetrics()
        self.routes: dict[str, Route] = {}
        self.batchers: dict[str, Batcher] = {}
        for route in routes:
            if route.name in self.routes:
                raise RuntimeConfigError(f"two sources serve a model named {route.name!r}",
                                         hint="name them: NAME=PATH")
            self.routes[route.name] = route
            self.batchers[route.name] = Batcher(route.name, self.metrics, max_batch=settings.max_batch,
                                                max_delay_s=settings.max_delay_ms / 1000, max_queue=settings.max_queue,
                                                delay=settings.batch_delay)
            self.metrics.model_info[route.name] = (lambda r=route: r.current.info() if r.current else {})
            route.on_switch = self._switched
            route.on_failure = lambda r, exc: self.metrics.count("load_failures", r.name)
            route.on_shadow = self._shadow_changed
        self.shadow_report: Path | None = settings.shadow_report
        self._report_thread: threading.Thread | None = None
        self.capture = None
        if settings.capture is not None:
            from ..capture import SampleCapture

            self.capture = SampleCapture(settings.capture)
        self.ssl_context = None
        if settings.tls_cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
            except (OSError, ssl.SSLError) as exc:
                raise RuntimeConfigError(f"cannot load the TLS certificate/key ({exc})",
                                         hint="give a PEM certificate chain and its private key") from None
            self.ssl_context = ctx
        self.httpd = _HTTPServer((settings.host, settings.port), _Handler)
        self.httpd.app = self
        self.port = self.httpd.server_address[1]
        self._stopped = threading.Event()

    def add_shadow(self, route_name: str, candidate: Any) -> Any:
        """Run ``candidate`` (a loaded :class:`~..api.Model`, owned from here on) in shadow of ``route_name``'s
        served model, in place of any shadow it had. Raises ``CONFIG_INVALID`` for a candidate that cannot run the
        served model's inputs (the caller closes it then)."""
        from .models import warm_up
        from .shadow import Shadow, check_compatible

        route = self.routes.get(route_name)
        if route is None or route.current is None:
            raise RuntimeConfigError(f"--shadow: no model is served as {route_name!r}",
                                     hint=f"routes: {', '.join(self.routes)}")
        check_compatible(route.current.model, candidate)
        warm_up(candidate, 1)
        self.remove_shadow(route_name)
        shadow = Shadow(route_name, candidate)
        self.batchers[route_name].shadow = shadow
        self.metrics.shadows[route_name] = shadow.metric_lines
        if self.shadow_report is not None and self._report_thread is None:
            self._report_thread = threading.Thread(target=self._write_reports, args=(self.shadow_report,),
                                                   name="edgekit-serve-shadow-report", daemon=True)
            self._report_thread.start()
        return shadow

    def remove_shadow(self, route_name: str) -> None:
        batcher = self.batchers[route_name]
        old, batcher.shadow = batcher.shadow, None
        self.metrics.shadows.pop(route_name, None)
        if old is not None:
            old.close()

    def _shadow_changed(self, route: Route, bundle: Path | None) -> None:
        """A followed state directory's shadow slot changed: run the new candidate, or none."""
        if bundle is None:
            if self.batchers[route.name].shadow is not None:
                log.info("%s: the shadow candidate is gone", route.name)
            self.remove_shadow(route.name)
            return
        from ..api import load

        try:
            candidate = load(bundle, **route.load_kwargs)
        except Exception as exc:  # noqa: BLE001 - a candidate that does not load never takes serving down
            log.error("%s: the shadow candidate %s does not load (%s)", route.name, bundle, exc)
            self.remove_shadow(route.name)
            return
        try:
            self.add_shadow(route.name, candidate)
        except Exception as exc:  # noqa: BLE001 - (incompatible inputs, a failing warm-up, an engine error)
            candidate.close()
            self.remove_shadow(route.name)
            log.error("%s: the shadow candidate cannot run beside the served model (%s)", route.name, exc)
            return
        log.info("%s: running %s %s in shadow", route.name, candidate.manifest.model.name,
                 candidate.manifest.model.version)

    def _write_reports(self, path: Path, every_s: float = 10.0) -> None:
        from ..fileio import atomic_write

        while not self._stopped.wait(every_s):
            shadows = {name: b.shadow for name, b in self.batchers.items()}
            reports = {name: sh.report() for name, sh in shadows.items() if sh is not None}
            try:
                atomic_write(path, json.dumps(reports, indent=1).encode(), durable=False)
            except OSError as exc:
                log.warning("cannot write the shadow report %s (%s)", path, exc)

    def _switched(self, route: Route, new: Loaded, old: Loaded | None) -> None:
        if old is not None:
            self.metrics.count("switches", route.name)

    # -- lifecycle -----------------------------------------------------------
    def route_report(self, name: str) -> dict[str, Any]:
        """What a route did lately, for the agent's telemetry: requests by status, queue, batch sizes, stage
        quantiles (ms), the model it serves, and its shadow candidate's report."""
        route, m = self.routes[name], self.metrics
        with m._lock:
            codes = {str(c): n for (r, c), n in m.requests.items() if r == name}
            sizes = dict(m.batches.get(name, {}))
        stages = {}
        for stage in ("decode", "preprocess", "queue", "inference", "postprocess", "total"):
            q = m.stage_quantiles(name, stage)
            if q:
                stages[stage] = {f"p{int(k * 100)}_ms": 1000 * v for k, v in q.items()}
        shadow = self.batchers[name].shadow
        return {"type": "serve", "route": name, "model": route.current.info() if route.current else None,
                "requests": codes, "queue_depth": self.batchers[name].depth(),
                "batches": sum(sizes.values()), "rows": sum(k * n for k, n in sizes.items()), "stages": stages,
                "shadow": shadow.report() if shadow is not None else None, "written_at": time.time()}

    def _write_route_reports(self, folder: Path, every_s: float = 10.0) -> None:
        from ..fileio import atomic_write

        folder.mkdir(parents=True, exist_ok=True)
        while not self._stopped.wait(every_s):
            for name in list(self.routes):
                try:
                    atomic_write(folder / f"serve-{name}.json", json.dumps(self.route_report(name)).encode(),
                                 durable=False)
                except OSError as exc:
                    log.warning("cannot write the report of %s into %s (%s)", name, folder, exc)

    def serve_forever(self) -> None:
        for route in self.routes.values():
            route.start()
        if self.settings.report_dir is not None:
            threading.Thread(target=self._write_route_reports, args=(self.settings.report_dir,),
                             name="edgekit-serve-reports", daemon=True).start()
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self._shutdown_rest()

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, embedding); :meth:`stop` ends it."""
        t = threading.Thread(target=self.serve_forever, name="edgekit-serve", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        """Stop accepting, answer what is queued, close the models."""
        self.httpd.shutdown()
        self._stopped.wait(timeout=30)

    def _shutdown_rest(self) -> None:
        for b in self.batchers.values():
            b.stop()
            if b.shadow is not None:
                b.shadow.close()
        for route in self.routes.values():
            route.close()
        self.httpd.server_close()
        self._stopped.set()

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.settings.host}:{self.port}"

    # -- requests ------------------------------------------------------------
    def route(self, name: str, version: str | None) -> Route:
        route = self.routes.get(name)
        if route is None:
            raise ProtocolError(f"no model named {name!r} is served (serving: {', '.join(self.routes)})",
                                status=404, code=ErrorCode.SERVE_MODEL_NOT_FOUND)
        if version is not None and route.current is not None and route.current.version != version:
            raise ProtocolError(f"{name!r} serves version {route.current.version!r}, not {version!r}",
                                status=404, code=ErrorCode.SERVE_MODEL_NOT_FOUND,
                                hint="leave the version out to reach whichever is active")
        return route

    def model_metadata(self, route: Route) -> dict[str, Any]:
        loaded = route.current
        if loaded is None:
            raise ProtocolError(f"no model is loaded for {route.name!r} yet", status=503,
                                code=ErrorCode.SERVE_NOT_READY)
        m = loaded.model
        pre = m.manifest.preprocess

        def tensor(spec: Any) -> dict[str, Any]:
            from .protocol import datatype_of

            return {"name": spec.name, "datatype": datatype_of(np.dtype(spec.dtype)),
                    "shape": [d if isinstance(d, int) else -1 for d in spec.shape]}

        return {
            "name": route.name, "versions": [loaded.version], "platform": f"edgekit_{m.engine.name}",
            "inputs": [tensor(s) for s in m.inputs], "outputs": [tensor(s) for s in m.outputs],
            "parameters": {
                **loaded.info(),
                "preprocess": pre.type if pre is not None else None,
                "postprocess": m.manifest.postprocess.type if m.manifest.postprocess is not None else None,
                "images_accepted": pre is not None and pre.type == "image",
                "batching": {**self.batchers[route.name].settings(), "enabled": loaded.batchable},
            },
        }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    app: Server

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, ssl.SSLError, TimeoutError, OSError)):
            log.debug("connection from %s ended: %s", client_address, exc)
        else:
            log.exception("unexpected error serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"edgekit-runtime/{__version__}"
    server: _HTTPServer

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        app = self.server.app
        self.timeout = app.settings.idle_timeout_s
        try:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if app.ssl_context is not None:  # the handshake runs in this connection's thread, not the listener's
            self.request.settimeout(10)
            self.request = app.ssl_context.wrap_socket(self.request, server_side=True)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("%s %s", self.address_string(), format % args)

    # -- replies -------------------------------------------------------------
    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        headers = dict(headers or {})
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._reply(status, json.dumps(doc).encode(), headers)

    def _error(self, exc: RuntimeErrorBase) -> int:
        status = status_of(exc)
        headers = dict(exc.headers) if isinstance(exc, ProtocolError) else {}
        self._reply(status, error_body(exc), headers)
        return status

    def _authorized(self) -> bool:
        token = self.server.app.settings.token
        if token is None:
            return True
        got = self.headers.get("Authorization", "")
        if got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), token.encode()):
            return True
        self._error(ProtocolError("a bearer token is needed", status=401, code=ErrorCode.SERVE_UNAUTHORIZED,
                                  hint="send 'Authorization: Bearer TOKEN'",
                                  headers={"WWW-Authenticate": 'Bearer realm="edgekit"'}))
        return False

    # -- GET -----------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        app = self.server.app
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/v2/health/live":
            return self._json(200, {"live": True})
        if path == "/v2/health/ready":
            ready = all(r.ready for r in app.routes.values())
            return self._json(200 if ready else 503, {"ready": ready})
        if not self._authorized():
            return None
        if path == "/metrics":
            return self._reply(200, app.metrics.render().encode(), {"Content-Type": "text/plain; version=0.0.4"})
        if path == "/v2":
            return self._json(200, {"name": "edgekit-runtime", "version": __version__,
                                    "extensions": ["binary_tensor_data"], "models": list(app.routes)})
        m = _MODEL_PATH.match(path)
        try:
            if m is None or m["rest"] == "/infer":
                raise ProtocolError(f"no such endpoint: GET {path}", status=404, code=ErrorCode.SERVE_BAD_REQUEST,
                                    hint="see /v2, /v2/models/NAME, /v2/health/ready, /metrics")
            route = app.route(m["name"], m["version"])
            if m["rest"] == "/ready":
                return self._json(200 if route.ready else 503, {"name": route.name, "ready": route.ready})
            if m["rest"] == "/shadow":
                shadow = app.batchers[route.name].shadow
                if shadow is None:
                    raise ProtocolError(f"{route.name!r} has no shadow candidate", status=404,
                                        code=ErrorCode.SERVE_MODEL_NOT_FOUND, hint="start serve with --shadow")
                return self._json(200, shadow.report())
            return self._json(200, app.model_metadata(route))
        except RuntimeErrorBase as exc:
            self._error(exc)
        return None

    do_HEAD = do_GET

    # -- POST ----------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802
        app = self.server.app
        t0 = time.monotonic()
        path = self.path.split("?", 1)[0].rstrip("/")
        m = _MODEL_PATH.match(path)
        label = m["name"] if m and m["name"] in app.routes else "-"
        status = 500
        body_read = False
        try:
            if not self._authorized():
                status = 401
                return
            if m is None or m["rest"] != "/infer":
                raise ProtocolError(f"no such endpoint: POST {path}", status=404, code=ErrorCode.SERVE_BAD_REQUEST,
                                    hint="POST /v2/models/NAME/infer")
            route = app.route(m["name"], None)
            batcher = app.batchers[route.name]
            with batcher.arrival() as arrival:
                body = self._body(app.settings.max_body_mb)
                body_read = True
                status = self._infer(app, route, body, t0, batcher, arrival, m["version"])
        except RuntimeErrorBase as exc:
            status = self._error(exc)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            status = 499
        except Exception as exc:  # noqa: BLE001 - a bug of ours: an HTTP answer all the same, and the log
            log.exception("unexpected error answering POST %s", path)
            status = self._error(RuntimeErrorBase(f"{type(exc).__name__}: {exc}",
                                                  code=ErrorCode.ENGINE_INFERENCE_FAILED))
        finally:
            if not body_read:
                # refused before its body was read (token, route, endpoint): that body must not be taken for
                # the next request on this connection
                self.close_connection = True
            app.metrics.request(label, status)

    def _body(self, max_mb: float) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or self.headers.get("Content-Length") is None:
            self.close_connection = True
            raise ProtocolError("the request has no Content-Length", status=411, code=ErrorCode.SERVE_BAD_REQUEST,
                                hint="send the body with a Content-Length (no chunked encoding)")
        try:
            n = int(self.headers["Content-Length"])
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise ProtocolError(f"Content-Length {self.headers['Content-Length']!r} is not a length")
        limit = int(max_mb * 1024 * 1024)
        if n > limit:
            self.close_connection = True
            self._discard(n)
            raise ProtocolError(f"the body is {n / 2**20:.1f} MiB, over this server's {max_mb:g} MiB",
                                status=413, code=ErrorCode.SERVE_REQUEST_TOO_LARGE,
                                hint="send smaller batches, or start the server with a larger --max-body-mb")
        body = self.rfile.read(n)
        if len(body) != n:
            self.close_connection = True
            raise ConnectionError("the client closed the connection mid-body")
        return body

    def _discard(self, n: int, seconds: float = 5.0) -> None:
        """Read and drop a refused body (up to ``seconds``), so the client gets to read the refusal."""
        end = time.monotonic() + seconds
        left = n
        try:
            while left > 0 and time.monotonic() < end:
                chunk = self.rfile.read1(min(left, 1 << 20)) if hasattr(self.rfile, "read1") else self.rfile.read(
                    min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (an EOF waits to be read) while its request is queued.
        Not known over TLS (a closing client's close_notify is data on the socket): such requests run."""
        sock = self.connection
        if isinstance(sock, ssl.SSLSocket):
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return socket.socket.recv(sock, 1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _infer(self, app: Server, route: Route, body: bytes, t0: float, batcher: Batcher, arrival: Any,
               version: str | None = None) -> int:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        loaded = route.acquire()
        metrics = app.metrics
        try:
            if version is not None and loaded.version != version:  # checked on the model that will answer
                raise ProtocolError(f"{route.name!r} serves version {loaded.version!r}, not {version!r}",
                                    status=404, code=ErrorCode.SERVE_MODEL_NOT_FOUND,
                                    hint="leave the version out to reach whichever is active")
            if ctype.startswith("image/"):
                req = InferRequest(inputs={"image": _object_array([body])})
            else:
                req = parse_request(body, self.headers.get(HEADER_LENGTH))
            feeds, metas, post = _feeds(loaded, req, metrics, route.name)
            timeout_us = req.parameters.get("timeout")
            budget = (timeout_us / 1e6 if isinstance(timeout_us, (int, float)) and timeout_us > 0
                      else app.settings.timeout_ms / 1000)
            pending = Pending(loaded, feeds, deadline=time.monotonic() + budget)
            batcher.submit(pending, arrival)
            give_up = pending.deadline + 300.0  # queued past its deadline it is dropped; running, 5 min at most
            while not pending.done.wait(0.01):
                if not pending.cancelled and pending.started is None and self._client_gone():
                    pending.cancelled = True  # the batcher drops it unrun
                if time.monotonic() > give_up:
                    raise RuntimeErrorBase("the engine did not answer within 5 minutes",
                                           code=ErrorCode.ENGINE_INFERENCE_FAILED)
            if pending.cancelled and pending.error is not None:
                self.close_connection = True
                return 499
            if pending.error is not None:
                raise pending.error
            t_post = time.monotonic()
            outputs = dict(pending.outputs)
            rows = None
            if post:
                rows = loaded.model.postprocess(outputs, meta=metas)
                outputs["results"] = _object_array([json.dumps(_jsonable(r), separators=(",", ":")).encode()
                                                    for r in rows])
                if req.outputs is None and metas is not None:  # images: the results, raw outputs when named
                    outputs = {"results": outputs["results"]}
            if req.outputs is not None:
                unknown = [n for n in req.outputs if n not in outputs]
                if unknown:
                    raise ProtocolError(f"no output named {unknown[0]!r} (outputs: {', '.join(outputs)})",
                                        code=ErrorCode.INPUT_MISSING)
                outputs = {n: outputs[n] for n in req.outputs}
            response, headers = encode_response(route.name, loaded.version, outputs, req,
                                                {"batch_size": pending.batch_size})
            metrics.stage(route.name, "postprocess", time.monotonic() - t_post)
            headers["Edgekit-Model-Version"] = loaded.version
            if loaded.slot:
                headers["Edgekit-Model-Slot"] = loaded.slot
            self._reply(200, response, headers)
            metrics.stage(route.name, "total", time.monotonic() - t0)
            if app.capture is not None and rows is not None and metas is not None:  # after the answer went out
                from ..capture import drift_z

                images = next(iter(req.inputs.values())).reshape(-1)
                model_info = {"name": route.name, **loaded.info()}
                z = drift_z(loaded.model, feeds[loaded.model.inputs[0].name])
                for i, (image, row) in enumerate(zip(images, rows)):
                    app.capture.offer(image, row, model_info, source="serve",
                                      drift_z=float(z[i]) if z is not None else None)
            return 200
        finally:
            route.release(loaded)


def _object_array(items: list[bytes]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def _decode(data: bytes, color: str) -> np.ndarray:
    cv2 = cv2_module()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise InputError(f"a {len(data)}-byte image is not one OpenCV can decode", code=ErrorCode.INPUT_UNREADABLE,
                         hint="send JPEG, PNG, BMP, TIFF or WebP bytes")
    if color == "rgb":
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if color == "gray":
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image


def _feeds(loaded: Loaded, req: InferRequest, metrics: ServeMetrics, name: str
           ) -> tuple[dict[str, np.ndarray], list[ImageMeta] | None, bool]:
    """The request's inputs → the model's feeds (checked), the images' metas, and whether to post-process."""
    model = loaded.model
    pre = model.manifest.preprocess
    images = [k for k, v in req.inputs.items() if v.dtype.kind == "O"]
    if images:
        if pre is None or pre.type != "image":
            raise InputError("this model takes tensors, not images (its bundle has no image pre-processing)",
                             code=ErrorCode.INPUT_UNSUPPORTED, hint="send its inputs as numeric tensors")
        if len(req.inputs) != 1:
            raise InputError("send the images as one BYTES input, without other inputs",
                             code=ErrorCode.INPUT_UNSUPPORTED)
        t = time.monotonic()
        decoded = [_decode(b, pre.color) for b in req.inputs[images[0]].reshape(-1)]
        if not decoded:
            raise InputError("the BYTES input holds no image", code=ErrorCode.INPUT_MISSING)
        t2 = time.monotonic()
        metrics.stage(name, "decode", t2 - t)
        metas: list[ImageMeta] = []
        x = model.preprocess(decoded, meta=metas)
        metrics.stage(name, "preprocess", time.monotonic() - t2)
        feeds = {model.inputs[0].name: x}
        _check(model, feeds)
        return feeds, metas, model.manifest.postprocess is not None
    wanted = {s.name for s in model.inputs}
    extra = [k for k in req.inputs if k not in wanted]
    if extra:
        raise InputError(f"the model has no input {extra[0]!r} (inputs: {', '.join(sorted(wanted))})",
                         code=ErrorCode.INPUT_MISSING)
    if req.parameters.get("preprocess"):
        if pre is None or pre.type != "tensor" or len(model.inputs) != 1:
            raise InputError("'preprocess' applies to single-input bundles with tensor pre-processing",
                             code=ErrorCode.INPUT_UNSUPPORTED, hint="leave it out and send the model's input")
        t = time.monotonic()
        feeds = {model.inputs[0].name: model.preprocess(next(iter(req.inputs.values())))}
        metrics.stage(name, "preprocess", time.monotonic() - t)
        _check(model, feeds)
        return feeds, None, model.manifest.postprocess is not None
    missing = wanted - set(req.inputs)
    if missing:
        raise InputError(f"input {sorted(missing)[0]!r} is missing", code=ErrorCode.INPUT_MISSING)
    feeds = {s.name: np.ascontiguousarray(req.inputs[s.name]) for s in model.inputs}
    _check(model, feeds)
    return feeds, None, False


def _check(model: Any, feeds: dict[str, np.ndarray]) -> None:
    """Refuse before queueing what the model would refuse (so it never joins, or fails, a batch):
    dtype, rank and every fixed dimension but the batch, which may hold any number of rows (a
    fixed batch B > 1 a multiple of B, run in steps)."""
    rows = {len(v) if v.ndim else 0 for v in feeds.values()}
    if len(rows) != 1 or 0 in rows:
        raise InputError(f"inputs must share a batch of at least one row (rows: {sorted(rows)})",
                         code=ErrorCode.INPUT_BAD_SHAPE)
    for spec in model.inputs:
        x = feeds[spec.name]
        if x.dtype != np.dtype(spec.dtype):
            raise InputError(f"input {spec.name!r} is {x.dtype}, the model takes {spec.dtype}",
                             code=ErrorCode.INPUT_BAD_DTYPE, hint="send it in the datatype /v2/models/NAME lists")
        fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else 1
        if (x.ndim != len(spec.shape) or len(x) % max(fixed, 1)
                or any(isinstance(d, int) and d != a for d, a in zip(spec.shape[1:], x.shape[1:]))):
            raise InputError(f"input {spec.name!r} has shape {list(x.shape)}, the model takes "
                             f"{[d if isinstance(d, int) else -1 for d in spec.shape]} (any batch)",
                             code=ErrorCode.INPUT_BAD_SHAPE)


def _jsonable(value: Any, key: str | None = None) -> Any:
    if isinstance(value, dict):
        return {("mask_png" if k == "mask" else k): _jsonable(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        if key == "mask":  # a segmentation mask: a PNG (pixel value = class index), base64
            ok, png = cv2_module().imencode(".png", np.ascontiguousarray(value, dtype=np.uint8))
            return base64.b64encode(png.tobytes()).decode() if ok else None
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def serve(sources: list[str], settings: ServeSettings, *, keyring: Any = None, threads: int | None = None,
          engine: str | None = None, ready_file: Path | None = None, shadow: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT; ``sources``: bundle paths or state directories, each optionally ``NAME=PATH``."""
    routes = []
    try:
        for src in sources:
            name, _, path = src.rpartition("=") if "=" in src and not Path(src).exists() else ("", "", src)
            p = Path(path)
            if not p.exists():
                raise RuntimeConfigError(f"{p} is neither a bundle nor an agent state directory",
                                         hint="give a .ekb file or the agent's state_dir")
            routes.append(Route(p, name=name or None, max_batch=settings.max_batch,
                                check_every_s=settings.check_every_s, keyring=keyring, threads=threads,
                                engine=engine, spin_wait=False if len(sources) > 1 else None))
        server = Server(routes, settings)
    except Exception:
        for r in routes:
            r.close()
        raise
    if shadow is not None:
        from ..api import load

        name, _, path = shadow.rpartition("=") if "=" in shadow and not Path(shadow).exists() else ("", "", shadow)
        if not name and len(server.routes) != 1:
            raise RuntimeConfigError("--shadow with several routes needs NAME=PATH", hint=f"routes: {', '.join(server.routes)}")
        candidate = load(path, keyring=keyring, threads=threads, engine=engine)
        try:
            server.add_shadow(name or next(iter(server.routes)), candidate)
        except Exception:
            candidate.close()
            server.httpd.server_close()
            for r in routes:
                r.close()
            raise

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    info = {"listening": server.url, "models": {n: (r.current.info() if r.current else None)
                                                for n, r in server.routes.items()}}
    print(json.dumps(info), flush=True)
    if ready_file is not None:
        ready_file.write_text(json.dumps(info))
    server.serve_forever()
    return 0
