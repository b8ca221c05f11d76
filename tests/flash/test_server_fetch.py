"""The bundle server's Range semantics and the device's resumable downloader, over real loopback HTTP(S).

Bundles here are arbitrary bytes named ``*.ekb``: neither side reads or verifies
their contents beyond the sha256.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import ipaddress
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edgekit.errors import EdgekitError
from edgekit.flash.server import BundleServer, parse_range
from edgekit_runtime.agent.fetch import fetch_bundle
from edgekit_runtime.contract.errors import BundleError, ErrorCode

from tests.polling import wait_until

SIZE = 200_000  # not a multiple of the 64 KiB chunk


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture()
def payload() -> bytes:
    return random.Random(5).randbytes(SIZE)


@pytest.fixture()
def bundle_dir(tmp_path, payload) -> Path:
    root = tmp_path / "bundles"
    root.mkdir()
    (root / "digits.ekb").write_bytes(payload)
    return root


@pytest.fixture()
def sha(payload) -> str:
    return hashlib.sha256(payload).hexdigest()


@pytest.fixture()
def server(bundle_dir):
    with BundleServer(bundle_dir) as srv:
        yield srv


@pytest.fixture()
def downloads(tmp_path) -> Path:
    return tmp_path / "state" / "downloads"


def request(srv: BundleServer, path: str, method: str = "GET", headers: dict | None = None):
    """One raw request (the path is sent as is, unnormalised); returns (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class _Scripted(BaseHTTPRequestHandler):
    """A misbehaving server for one test: ``server.script(handler, n)`` answers the n-th request (from 1)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.seen.append(self.headers.get("Range"))
        self.server.script(self, len(self.server.seen))


def send(handler: BaseHTTPRequestHandler, data: bytes, *, honour_range: bool = True, cut: int | None = None,
         status: int | None = None) -> None:
    """Send ``data`` (or its requested tail); ``cut``: close after that many body bytes."""
    start = 0
    rng = handler.headers.get("Range")
    if status is None:
        if honour_range and rng:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            status = 206
        else:
            status = 200
    body = data[start:] if status in (200, 206) else b"nope\n"
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    if status == 206:
        handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    handler.end_headers()
    if cut is not None:
        handler.wfile.write(body[:cut])
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)
        return
    handler.wfile.write(body)


@pytest.fixture()
def scripted():
    servers = []

    def start(script) -> tuple[str, list]:
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
        srv.daemon_threads = True
        srv.script, srv.seen = script, []
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/bundles/x.ekb", srv.seen

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def leftovers(downloads: Path) -> list[str]:
    return sorted(p.name for p in downloads.iterdir()) if downloads.exists() else []


# ----------------------------------------------------------------------------- server: ranges
def test_full_get_has_the_headers_a_resuming_client_needs(server, payload, sha):
    status, headers, body = request(server, f"/bundles/{sha}.ekb")
    assert status == 200 and body == payload
    assert headers["content-length"] == str(SIZE)
    assert headers["accept-ranges"] == "bytes"
    assert headers["etag"] == f'"{sha}"'
    assert headers["content-type"] == "application/octet-stream"
    assert "content-range" not in headers


@pytest.mark.parametrize("spec, first, last", [
    ("bytes=10-99", 10, 99),
    ("bytes=150000-", 150_000, SIZE - 1),
    ("bytes=-500", SIZE - 500, SIZE - 1),
    ("bytes=199990-999999", 199_990, SIZE - 1),  # last past the end is clamped
    ("bytes=-999999", 0, SIZE - 1),  # suffix longer than the file: all of it, still 206
    ("bytes=7-7", 7, 7),
])
def test_single_range_is_206_with_exactly_those_bytes(server, payload, sha, spec, first, last):
    status, headers, body = request(server, f"/bundles/{sha}.ekb", headers={"Range": spec})
    assert status == 206
    assert body == payload[first:last + 1]
    assert headers["content-range"] == f"bytes {first}-{last}/{SIZE}"
    assert headers["content-length"] == str(last - first + 1)
    assert headers["etag"] == f'"{sha}"'


@pytest.mark.parametrize("spec", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 10}", "bytes=-0"])
def test_unsatisfiable_range_is_416_with_the_size(server, sha, spec):
    status, headers, _ = request(server, f"/bundles/{sha}.ekb", headers={"Range": spec})
    assert status == 416
    assert headers["content-range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize("spec", ["bytes=0-1,5-6", "bytes=9-2", "items=0-1", "bytes=abc", "bytes=-"])
def test_multi_range_or_malformed_range_sends_the_whole_file(server, payload, sha, spec):
    status, headers, body = request(server, f"/bundles/{sha}.ekb", headers={"Range": spec})
    assert (status, body) == (200, payload)
    assert "content-range" not in headers


def test_if_range_honours_the_range_only_for_the_current_etag(server, payload, sha):
    status, _, body = request(server, f"/bundles/{sha}.ekb", headers={"Range": "bytes=100-", "If-Range": f'"{sha}"'})
    assert (status, body) == (206, payload[100:])
    for stale in ('"' + "0" * 64 + '"', f'W/"{sha}"', "Wed, 21 Oct 2015 07:28:00 GMT"):
        status, _, body = request(server, f"/bundles/{sha}.ekb", headers={"Range": "bytes=100-", "If-Range": stale})
        assert (status, body) == (200, payload), stale


def test_head_gives_headers_without_a_body_and_ignores_range(server, sha):
    status, headers, body = request(server, f"/bundles/{sha}.ekb", method="HEAD", headers={"Range": "bytes=0-9"})
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(SIZE) and headers["etag"] == f'"{sha}"'
    assert request(server, "/bundles/digits.ekb", method="HEAD")[0] == 200
    assert server.bytes_sent == 0


def test_served_by_name_and_by_content_hash(server, payload):
    status, headers, body = request(server, "/bundles/digits.ekb")
    assert (status, body) == (200, payload)
    etag = headers["etag"].strip('"')
    assert request(server, f"/bundles/{etag}.ekb")[2] == payload


def test_index_lists_every_bundle_and_follows_replacements(server, bundle_dir, sha):
    (bundle_dir / "notes.txt").write_text("not a bundle")
    (bundle_dir / "sub").mkdir()
    (bundle_dir / "sub" / "hidden.ekb").write_bytes(b"nested")
    status, headers, body = request(server, "/index.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == [{"name": "digits.ekb", "sha256": sha, "size": SIZE}]

    (bundle_dir / "digits.ekb").write_bytes(b"v2")  # other size, so the cached hash is stale
    new_sha = hashlib.sha256(b"v2").hexdigest()
    assert json.loads(request(server, "/index.json")[2]) == [{"name": "digits.ekb", "sha256": new_sha, "size": 2}]
    assert request(server, f"/bundles/{sha}.ekb")[0] == 404
    assert request(server, f"/bundles/{new_sha}.ekb")[2] == b"v2"


@pytest.mark.parametrize("path", [
    "/bundles/missing.ekb", "/bundles/" + "a" * 64 + ".ekb", "/bundles/digits", "/digits.ekb", "/",
    "/bundles/../secret.ekb", "/bundles/..%2fsecret.ekb", "/bundles/%2e%2e%2Fsecret.ekb",
    "/bundles/..%5csecret.ekb", "/bundles/sub/hidden.ekb", "/bundles/sub%2Fhidden.ekb", "/bundles/",
])
def test_unknown_paths_and_traversal_are_404(server, bundle_dir, path):
    (bundle_dir.parent / "secret.ekb").write_bytes(b"outside root")
    (bundle_dir / "sub").mkdir()
    (bundle_dir / "sub" / "hidden.ekb").write_bytes(b"nested")
    status, _, body = request(server, path)
    assert status == 404
    assert b"outside root" not in body and b"nested" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_methods_other_than_get_and_head_are_405(server, method):
    status, headers, _ = request(server, "/bundles/digits.ekb", method=method)
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_parse_range_edge_cases():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=-1", 0) == "unsatisfiable"  # nothing to give from an empty file
    assert parse_range("bytes=0-", 0) == "unsatisfiable"


# ----------------------------------------------------------------------------- server: add, errors
def test_add_places_the_bundle_and_returns_a_working_url(server, bundle_dir, tmp_path):
    outside = tmp_path / "dist" / "model.ekb"
    outside.parent.mkdir()
    outside.write_bytes(b"model v1")
    info = server.add(outside)
    sha1 = hashlib.sha256(b"model v1").hexdigest()
    assert info == {"url": f"{server.url}/bundles/{sha1}.ekb", "sha256": sha1, "size": 8, "name": "model.ekb"}
    assert (bundle_dir / "model.ekb").read_bytes() == b"model v1"
    assert request(server, f"/bundles/{sha1}.ekb")[2] == b"model v1"
    assert server.url_for(outside) == server.url_for(sha1) == info["url"]

    outside.unlink()
    outside.write_bytes(b"model v2")  # same name, new content: v1 stays servable
    info2 = server.add(outside)
    sha2 = hashlib.sha256(b"model v2").hexdigest()
    assert info2["name"] == f"model-{sha2[:12]}.ekb" and info2["sha256"] == sha2
    assert request(server, f"/bundles/{sha1}.ekb")[2] == b"model v1"
    assert request(server, f"/bundles/{sha2}.ekb")[2] == b"model v2"

    inside = server.add(bundle_dir / "digits.ekb")  # already in root: nothing copied
    assert inside["name"] == "digits.ekb"
    assert {p.name for p in bundle_dir.iterdir()} == {"digits.ekb", "model.ekb", info2["name"]}
    outside.write_bytes(b"model v3")  # rewriting the source in place does not touch what is served
    assert request(server, f"/bundles/{sha2}.ekb")[2] == b"model v2"


def test_root_must_be_a_directory(tmp_path):
    with pytest.raises(EdgekitError, match="not a directory"):
        BundleServer(tmp_path / "nope")


def test_port_in_use_is_a_clear_error(bundle_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(EdgekitError, match=r"already in use.*--port"):
            BundleServer(bundle_dir, port=busy.getsockname()[1]).start()


# ----------------------------------------------------------------------------- fetch
def test_fetch_downloads_and_verifies(server, downloads, payload, sha):
    seen = []
    path = fetch_bundle(server.url_for(sha), downloads, sha, SIZE,
                        progress=lambda done, total: seen.append((done, total)))
    assert path == downloads / f"{sha}.ekb" and path.read_bytes() == payload
    assert leftovers(downloads) == [f"{sha}.ekb"]
    assert seen[-1] == (SIZE, SIZE) and len(seen) >= 2
    # the server records a request after its last byte left, which can be just after the client is done
    wait_until(lambda: len(server.requests) == 1)
    assert server.bytes_sent == SIZE

    # already there and verified: no second download
    assert fetch_bundle(server.url_for(sha), downloads, sha, SIZE) == path
    assert len(server.requests) == 1


def test_fetch_resumes_a_part_left_by_an_earlier_attempt(server, downloads, payload, sha):
    half = SIZE // 2
    downloads.mkdir(parents=True)
    (downloads / f"{sha}.part").write_bytes(payload[:half])
    path = fetch_bundle(server.url_for(sha), downloads, sha, SIZE)
    assert path.read_bytes() == payload
    wait_until(lambda: len(server.requests) == 1)
    (req,) = server.requests
    assert (req.range, req.status, req.body_bytes) == (f"bytes={half}-", 206, SIZE - half)
    assert server.bytes_sent == SIZE - half


def test_fetch_retries_when_the_server_closes_mid_body(scripted, downloads, payload, sha):
    def script(handler, n):
        send(handler, payload, cut=70_000 if n == 1 else None)

    url, seen = scripted(script)
    path = fetch_bundle(url, downloads, sha, SIZE, backoff_s=0.01)
    assert path.read_bytes() == payload
    assert seen == [None, "bytes=70000-"]  # the retry asked only for what was missing


def test_fetch_restarts_when_the_server_ignores_the_range(scripted, downloads, payload, sha):
    url, seen = scripted(lambda handler, n: send(handler, payload, honour_range=False))
    downloads.mkdir(parents=True)
    (downloads / f"{sha}.part").write_bytes(b"\0" * 1000)  # and it was garbage anyway
    assert fetch_bundle(url, downloads, sha, SIZE).read_bytes() == payload
    assert seen == ["bytes=1000-"]


def test_fetch_starts_over_when_the_server_resumes_at_the_wrong_byte(scripted, downloads, payload, sha):
    def script(handler, n):
        if n == 1:  # answers the resume with a 206 from byte 0
            handler.send_response(206)
            handler.send_header("Content-Length", str(SIZE))
            handler.send_header("Content-Range", f"bytes 0-{SIZE - 1}/{SIZE}")
            handler.end_headers()
            handler.wfile.write(payload)
        else:
            send(handler, payload)

    url, seen = scripted(script)
    downloads.mkdir(parents=True)
    (downloads / f"{sha}.part").write_bytes(payload[:1000])
    assert fetch_bundle(url, downloads, sha, SIZE, backoff_s=0.01).read_bytes() == payload
    assert seen == ["bytes=1000-", None]  # the part was dropped, not appended to


def test_fetch_verifies_a_complete_part_on_416(server, downloads, payload, sha):
    downloads.mkdir(parents=True)
    part = downloads / f"{sha}.part"
    part.write_bytes(payload)  # no size pinned, so only the server can say it is complete
    assert fetch_bundle(server.url_for(sha), downloads, sha).read_bytes() == payload
    wait_until(lambda: len(server.requests) == 1)
    assert server.requests[0].status == 416 and server.bytes_sent == 0


def test_fetch_discards_an_overlong_part_and_starts_over(server, downloads, payload, sha):
    downloads.mkdir(parents=True)
    (downloads / f"{sha}.part").write_bytes(payload + b"junk")
    assert fetch_bundle(server.url_for(sha), downloads, sha).read_bytes() == payload
    wait_until(lambda: len(server.requests) == 2)
    assert [r.status for r in server.requests] == [416, 200]
    assert leftovers(downloads) == [f"{sha}.ekb"]


def test_fetch_gives_up_after_retries_on_5xx(scripted, downloads, payload, sha):
    url, seen = scripted(lambda handler, n: send(handler, payload, status=503))
    with pytest.raises(BundleError) as err:
        fetch_bundle(url, downloads, sha, SIZE, retries=2, backoff_s=0.01)
    assert err.value.code == ErrorCode.BUNDLE_DOWNLOAD_FAILED
    assert "503" in err.value.message and "/bundles/x.ekb" in err.value.message and err.value.hint
    assert len(seen) == 3


def test_fetch_404_fails_at_once(server, downloads):
    missing = "b" * 64
    start = time.monotonic()
    with pytest.raises(BundleError) as err:
        fetch_bundle(server.url_for(missing), downloads, missing, retries=5, backoff_s=2)
    assert time.monotonic() - start < 1.5  # a single backoff would already be 2 s
    assert err.value.code == ErrorCode.BUNDLE_DOWNLOAD_FAILED
    assert "HTTP 404" in err.value.message and server.url_for(missing) in err.value.message
    wait_until(lambda: len(server.requests) == 1)
    assert leftovers(downloads) == []


def test_fetch_wrong_sha_is_a_checksum_mismatch_and_leaves_nothing(server, downloads, sha):
    wrong = "c" * 64
    with pytest.raises(BundleError) as err:
        fetch_bundle(f"{server.url}/bundles/digits.ekb", downloads, wrong, SIZE)
    assert err.value.code == ErrorCode.BUNDLE_CHECKSUM_MISMATCH
    assert wrong in err.value.message and sha in err.value.message  # expected and got
    assert leftovers(downloads) == []


def test_fetch_of_a_truncated_file_is_a_checksum_mismatch(server, bundle_dir, downloads, payload, sha):
    (bundle_dir / "cut.ekb").write_bytes(payload[:SIZE - 1000])
    url = f"{server.url}/bundles/cut.ekb"
    with pytest.raises(BundleError) as err:  # no size pinned: the sha256 catches it
        fetch_bundle(url, downloads, sha)
    assert err.value.code == ErrorCode.BUNDLE_CHECKSUM_MISMATCH and sha in err.value.message
    assert leftovers(downloads) == []

    received = []
    with pytest.raises(BundleError) as err:  # size pinned: refused from Content-Length, before the body is read
        fetch_bundle(url, downloads, sha, SIZE, progress=lambda done, total: received.append(done))
    assert err.value.code == ErrorCode.BUNDLE_CHECKSUM_MISMATCH
    assert f"is {SIZE - 1000} bytes according to the server, expected {SIZE}" in err.value.message
    assert received == [] and leftovers(downloads) == []


def test_fetch_respects_max_bytes(server, downloads, sha):
    with pytest.raises(BundleError, match="download limit") as err:
        fetch_bundle(server.url_for(sha), downloads, sha, max_bytes=1000)
    assert err.value.code == ErrorCode.BUNDLE_DOWNLOAD_FAILED
    with pytest.raises(BundleError, match="over the 1000-byte limit"):
        fetch_bundle(server.url_for(sha), downloads, sha, SIZE, max_bytes=1000)
    assert leftovers(downloads) == []


def test_should_stop_interrupts_and_the_part_resumes(bundle_dir, downloads, payload, sha):
    with BundleServer(bundle_dir, rate_limit_bps=400_000) as slow:  # ~0.5 s for the whole file
        done = []
        with pytest.raises(BundleError, match="interrupted") as err:
            fetch_bundle(slow.url_for(sha), downloads, sha, SIZE, progress=lambda d, t: done.append(d),
                         should_stop=lambda: bool(done))
        assert err.value.code == ErrorCode.BUNDLE_DOWNLOAD_FAILED
        part = downloads / f"{sha}.part"
        kept = part.stat().st_size
        assert 0 < kept < SIZE and part.read_bytes() == payload[:kept]
        assert not (downloads / f"{sha}.ekb").exists()

        assert fetch_bundle(slow.url_for(sha), downloads, sha, SIZE).read_bytes() == payload
        wait_until(lambda: len(slow.requests) == 2)
        assert [(r.range, r.status) for r in slow.requests if r.range] == [(f"bytes={kept}-", 206)]


def test_file_url_is_copied_with_the_same_checks(bundle_dir, downloads, payload, sha):
    url = (bundle_dir / "digits.ekb").as_uri()
    assert fetch_bundle(url, downloads, sha, SIZE).read_bytes() == payload
    with pytest.raises(BundleError) as err:
        fetch_bundle(url, downloads / "other", "d" * 64)
    assert err.value.code == ErrorCode.BUNDLE_CHECKSUM_MISMATCH
    with pytest.raises(BundleError) as err:
        fetch_bundle((bundle_dir / "gone.ekb").as_uri(), downloads / "other", sha)
    assert err.value.code == ErrorCode.BUNDLE_DOWNLOAD_FAILED and "gone.ekb" in err.value.message


@pytest.mark.parametrize("url, sha, match", [
    ("ftp://host/x.ekb", "e" * 64, "unsupported URL scheme"),
    ("http://127.0.0.1:1/x.ekb", "E" * 64, "64 lowercase hex"),
    ("http://127.0.0.1:1/x.ekb", "e" * 63, "64 lowercase hex"),
])
def test_fetch_refuses_bad_arguments(downloads, url, sha, match):
    with pytest.raises(BundleError, match=match) as err:
        fetch_bundle(url, downloads, sha)
    assert err.value.code == ErrorCode.BUNDLE_DOWNLOAD_FAILED


def test_connection_refused_is_retried_then_reported(downloads):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BundleError, match="after 3 attempts") as err:
        fetch_bundle(f"http://user:secret@127.0.0.1:{port}/b.ekb?token=x", downloads, "f" * 64,
                     retries=2, backoff_s=0.01)
    assert "secret" not in str(err.value) and "token" not in str(err.value)  # credentials are not logged


# ----------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgekit test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_with_the_servers_certificate(bundle_dir, downloads, payload, sha, tls_cert):
    cert, key = tls_cert
    with BundleServer(bundle_dir, tls_cert=cert, tls_key=key) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        downloads.mkdir(parents=True)
        (downloads / f"{sha}.part").write_bytes(payload[:1234])  # resume works over TLS too
        path = fetch_bundle(srv.url_for(sha), downloads, sha, SIZE, ca_file=cert)
        assert path.read_bytes() == payload
        wait_until(lambda: len(srv.requests) == 1)
        assert srv.requests[0].status == 206

        # without the CA the certificate is refused at once, not retried
        with pytest.raises(BundleError, match="TLS certificate") as err:
            fetch_bundle(srv.url_for(sha), downloads / "other", sha, SIZE, retries=3, backoff_s=1)
        assert err.value.code == ErrorCode.BUNDLE_DOWNLOAD_FAILED and "ca_file" in err.value.hint

        # and plain HTTP to the TLS port gets no bundle
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            request(srv, f"/bundles/{sha}.ekb")
