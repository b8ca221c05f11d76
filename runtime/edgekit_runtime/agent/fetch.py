"""Resumable, verified download of a bundle onto the device (standard library only).

:func:`fetch_bundle` downloads ``url`` into ``downloads_dir`` and returns
``downloads_dir/<sha256>.ekb`` only once its size and sha256 match the values the
install command pinned. The resume rules:

* Bytes land in ``downloads_dir/<sha256>.part``. Whatever a previous attempt left
  there — an attempt of this call, or of a process that was killed or lost power —
  is kept, and the next request asks only for the rest: ``Range: bytes=<len>-``
  with ``If-Range: "<sha256>"``, so a server whose file changed sends it whole.
* ``206`` appends to the part, after checking that ``Content-Range`` starts where
  the part ends (otherwise the part is discarded and the download restarts).
  ``200`` means the server ignored the range: the part is truncated and the body
  written from byte 0. ``416`` means the part already holds everything (or more):
  it is verified, and discarded and downloaded again if it does not verify.
* A part as long as the pinned ``size`` is verified without asking the server.
* Connection errors, timeouts, a body cut short, ``5xx``, ``408`` and ``429`` are
  retried with exponential backoff (``backoff_s``, doubling, at most 30 s; a
  ``Retry-After`` is honoured up to 60 s), each retry resuming from the part.
  ``retries`` bounds the failures in a row *without progress*: an attempt that
  leaves the part longer than ever before resets the count, so a long download
  over a flaky link finishes, while a server that never gets further gives up.
  Any other ``4xx`` fails at once.
* The result must match the pinned size and sha256; a mismatch deletes the part
  (its bytes are of some other file) and raises ``BUNDLE_CHECKSUM_MISMATCH``. A
  body longer than the pinned size, or a server that announces another size,
  fails the same way before more is downloaded.
* On success the part is fsynced and renamed atomically to ``<sha256>.ekb``; an
  existing ``<sha256>.ekb`` that verifies is returned without any download.
* ``should_stop()`` returning true stops the download with a ``BUNDLE_DOWNLOAD_FAILED``
  "interrupted" error and keeps the part for the next call to resume.

``file://`` URLs are copied with the same rules (resuming a part too); ``https://``
verifies the server against ``ca_file`` when given, else the system CAs. One
download per sha256 at a time: the agent installs one bundle at a time.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

from .. import __version__
from ..contract.errors import BundleError, ErrorCode
from ..fileio import fsync_dir, sha256_file  # noqa: F401 - sha256_file: also imported from here

log = logging.getLogger("edgekit_runtime.agent.fetch")

GiB = 1024 ** 3
DEFAULT_MAX_BYTES = 4 * GiB
CHUNK = 64 * 1024
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 60.0
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_TRANSIENT_4XX = (408, 429)  # request timeout, too many requests: the server asks us to come back


def fetch_bundle(url: str, downloads_dir: Path, sha256: str, size: int | None = None, *, timeout: float = 30.0,
                 retries: int = 5, backoff_s: float = 0.5, ca_file: Path | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, progress: Callable[[int, int | None], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Path:
    """Download ``url`` to ``downloads_dir/<sha256>.ekb``, resuming a previous partial download.

    ``sha256`` (64 lowercase hex) and ``size`` (when given) are what the file must
    match. ``timeout`` applies to each connect and read; ``max_bytes`` bounds the
    download when no size is pinned. ``progress(done, total)`` is called as bytes
    arrive (``total`` is None when unknown). Raises :class:`BundleError` with
    ``BUNDLE_DOWNLOAD_FAILED`` or ``BUNDLE_CHECKSUM_MISMATCH``; see the module
    docstring for the resume and retry rules.
    """
    shown = _redact(url)
    if not isinstance(sha256, str) or not _SHA_RE.fullmatch(sha256):
        raise _failed(f"not downloading {shown}: the pinned sha256 {sha256!r} is not 64 lowercase hex digits",
                      "send the install command with the bundle's sha256 (edgekit serve prints it)")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise _failed(f"not downloading {shown}: the pinned size {size!r} is not a byte count",
                      "send the bundle's size in bytes, or leave it out")
    if size is not None and size > max_bytes:
        raise _failed(f"not downloading {shown}: the bundle is {size} bytes, over the {max_bytes}-byte limit",
                      "raise the agent's download size limit or ship a smaller bundle")
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise _failed(f"cannot download {shown}: unsupported URL scheme {scheme or '(none)'!r}",
                      "use an http://, https:// or file:// URL")

    downloads_dir = Path(downloads_dir)
    downloads_dir.mkdir(parents=True, exist_ok=True)
    final = downloads_dir / f"{sha256}.ekb"
    if final.is_file():
        if (size is None or final.stat().st_size == size) and sha256_file(final) == sha256:
            log.info("%s already downloaded", final.name)
            return final
        final.unlink()  # damaged leftover; fetch it again

    job = _Download(url, shown, downloads_dir / f"{sha256}.part", sha256, size, max_bytes, progress, should_stop)
    if scheme == "file":
        job.copy_local()
    else:
        job.fetch_http(_opener(scheme, ca_file, shown), timeout, retries, backoff_s)
    job.verify()
    _fsync_file(job.part)
    os.replace(job.part, final)
    fsync_dir(downloads_dir)
    return final


class _Transient(Exception):
    """A failure worth retrying, resuming from what is on disk."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Download:
    def __init__(self, url: str, shown: str, part: Path, sha256: str, size: int | None, max_bytes: int,
                 progress: Callable[[int, int | None], None] | None, should_stop: Callable[[], bool] | None):
        self.url, self.shown, self.part, self.sha256 = url, shown, part, sha256
        self.size, self.max_bytes = size, max_bytes
        self.progress, self.should_stop = progress, should_stop

    # -- the part file
    def part_len(self) -> int:
        try:
            return self.part.stat().st_size
        except FileNotFoundError:
            return 0

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)

    def part_verifies(self) -> bool:
        return self.part.is_file() and (self.size is None or self.part_len() == self.size) \
            and sha256_file(self.part) == self.sha256

    def verify(self) -> None:
        """The part must be the pinned file; if not, delete it and raise CHECKSUM_MISMATCH."""
        got_size = self.part_len()
        if self.size is not None and got_size != self.size:
            self.discard()
            raise _mismatch(f"{self.shown} is {got_size} bytes, expected {self.size}")
        got = sha256_file(self.part)
        if got != self.sha256:
            self.discard()
            raise _mismatch(f"{self.shown} has sha256 {got}, expected {self.sha256}")

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise _failed(f"download of {self.shown} interrupted after {self.part_len()} bytes",
                          "the partial download is kept and resumes on the next attempt")

    def check_total(self, total: int) -> None:
        """Refuse before downloading a body whose announced size cannot be right."""
        if self.size is not None and total != self.size:
            self.discard()
            raise _mismatch(f"{self.shown} is {total} bytes according to the server, expected {self.size}")
        if total > self.max_bytes:
            self.discard()
            raise _failed(f"{self.shown} is {total} bytes, over the {self.max_bytes}-byte download limit",
                          "raise the agent's download size limit or ship a smaller bundle")

    def receive(self, read: Callable[[int], bytes], mode: str, offset: int, expected: int | None,
                total: int | None) -> int:
        """Write what ``read`` yields to the part (``expected`` bytes, or until EOF); returns bytes received."""
        limit = self.size if self.size is not None else self.max_bytes
        announced = self.size if self.size is not None else total
        done, received = offset, 0
        try:
            out = open(self.part, mode)
        except OSError as exc:
            raise _failed(f"cannot write the download of {self.shown} to {self.part}: {exc}",
                          "check that the agent's state directory is writable") from exc
        with out:
            while expected is None or received < expected:
                self.check_stop()
                chunk = read(CHUNK if expected is None else min(CHUNK, expected - received))
                if not chunk:
                    break
                if done + len(chunk) > limit:
                    out.close()
                    self.discard()
                    if self.size is not None:
                        raise _mismatch(f"{self.shown} is longer than the pinned {self.size} bytes")
                    raise _failed(f"{self.shown} is over the {self.max_bytes}-byte download limit",
                                  "raise the agent's download size limit or ship a smaller bundle")
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise _failed(f"cannot write the download of {self.shown} to {self.part}: {exc}",
                                  "free space in the agent's state directory; the download resumes") from exc
                done += len(chunk)
                received += len(chunk)
                if self.progress is not None:
                    self.progress(done, announced)
        return received

    # -- file://
    def copy_local(self) -> None:
        parts = urlsplit(self.url)
        if parts.netloc not in ("", "localhost"):
            raise _failed(f"cannot copy {self.shown}: a file:// URL must name this machine, not {parts.netloc!r}",
                          "use file:///absolute/path or an http(s):// URL")
        source = Path(urllib.request.url2pathname(parts.path))
        try:
            src = open(source, "rb")
        except OSError as exc:
            raise _failed(f"cannot read {self.shown}: {exc.strerror or exc}",
                          "check that the bundle exists on the device at that path") from exc
        with src:
            total = os.fstat(src.fileno()).st_size
            self.check_total(total)
            offset = self.part_len()
            if offset > total or (offset == total and offset and not self.part_verifies()):
                self.discard()
                offset = 0
            if offset == total and offset:
                return
            src.seek(offset)
            self.receive(src.read, "ab" if offset else "wb", offset, total - offset, total)

    # -- http(s)://
    def fetch_http(self, opener: urllib.request.OpenerDirector, timeout: float, retries: int,
                   backoff_s: float) -> None:
        failures, furthest = 0, self.part_len()
        while True:
            self.check_stop()
            try:
                self.attempt(opener, timeout)
                return
            except _Transient as exc:
                length = self.part_len()
                if length > furthest:  # got further than ever: the budget is for stalls, not for the download
                    furthest, failures = length, 0
                failures += 1
                if failures > retries:
                    raise _failed(f"download of {self.shown} failed after {failures} attempts in a row: {exc}",
                                  "check that the server is up and reachable from the device; "
                                  "the partial download is kept and resumes on the next attempt") from None
                delay = min(MAX_BACKOFF_S, backoff_s * 2 ** (failures - 1))
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, MAX_RETRY_AFTER_S))
                log.warning("download of %s: %s; retry %d/%d in %.1f s (have %d bytes)",
                            self.shown, exc, failures, retries, delay, length)
                self._sleep(delay)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.check_stop()
            time.sleep(min(left, 0.1))

    def attempt(self, opener: urllib.request.OpenerDirector, timeout: float) -> None:
        """One request; returns once the part holds the whole body (per the server), else raises."""
        offset = self.part_len()
        if offset and self.size is not None and offset >= self.size:
            if offset == self.size and self.part_verifies():
                return
            log.info("discarding %s: %d bytes that are not the pinned file", self.part.name, offset)
            self.discard()
            offset = 0
        request = urllib.request.Request(self.url, headers={
            "User-Agent": f"edgekit-agent/{__version__}", "Accept-Encoding": "identity"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
            request.add_header("If-Range", f'"{self.sha256}"')
        try:
            response = opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                complete = self._http_error(exc, offset)
            if complete:
                return
            return self.attempt(opener, timeout)  # part discarded: start over (no Range, so no second 416)
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise _tls_failed(self.shown, exc.reason) from exc
            raise _Transient(f"cannot connect: {exc.reason}") from exc
        except ssl.SSLCertVerificationError as exc:
            raise _tls_failed(self.shown, exc) from exc
        except (OSError, http.client.HTTPException) as exc:  # timeout, reset, closed before the status line
            raise _Transient(_describe(exc)) from exc

        def read(n: int) -> bytes:
            try:
                return response.read(n)
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"connection lost mid-body: {_describe(exc)}") from exc

        with response:
            status = response.status
            if status == 206:
                match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", "").strip())
                if match is None:
                    self.discard()
                    raise _Transient(f"HTTP 206 without a usable Content-Range "
                                     f"({response.headers.get('Content-Range')!r}); starting over")
                first, last, total = int(match.group(1)), int(match.group(2)), match.group(3)
                if first != offset:
                    self.discard()
                    raise _Transient(f"server resumed at byte {first} instead of {offset}; starting over")
                total = None if total == "*" else int(total)
                if total is not None:
                    self.check_total(total)
                expected, mode = last - first + 1, "ab"
            elif status == 200:
                if offset:
                    log.info("%s: the server sent the whole file (range ignored); restarting from 0", self.shown)
                length = response.headers.get("Content-Length")
                total = int(length) if length is not None and length.strip().isdigit() else None
                if total is not None:
                    self.check_total(total)
                offset, expected, mode = 0, total, "wb"
            else:
                raise _failed(f"download of {self.shown} failed: unexpected HTTP {status} {response.reason}",
                              "serve the bundle with edgekit serve or any server that answers 200/206")
            received = self.receive(read, mode, offset, expected, total)
        if expected is not None and received < expected:
            raise _Transient(f"connection closed after {received} of {expected} bytes")
        if status == 206 and total is not None and self.part_len() < total:
            raise _Transient(f"the server sent bytes {offset}-{offset + received - 1} of {total}; asking for the rest")

    def _http_error(self, exc: urllib.error.HTTPError, offset: int) -> bool:
        """416 on a resume: True when the part is the whole file, False once discarded; raises otherwise."""
        status = f"HTTP {exc.code} {exc.reason}"
        if exc.code == 416 and offset:
            if self.part_verifies():
                return True
            log.info("%s: %s for %d bytes that do not verify; starting over", self.shown, status, offset)
            self.discard()
            return False
        if exc.code >= 500 or exc.code in _TRANSIENT_4XX:
            raise _Transient(status, retry_after=_retry_after(exc.headers.get("Retry-After")))
        hints = {404: "the server does not have this bundle: check the URL (edgekit serve lists its bundles "
                      "at /index.json)",
                 401: "the server wants credentials the agent does not have",
                 403: "the server refused access to the bundle"}
        raise _failed(f"download of {self.shown} failed: {status}",
                      hints.get(exc.code, "check the URL in the install command"))


def _opener(scheme: str, ca_file: Path | None, shown: str) -> urllib.request.OpenerDirector:
    if scheme != "https":
        return urllib.request.build_opener()
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise _failed(f"cannot download {shown}: cannot load the CA file {ca_file}: {exc}",
                      "point ca_file at the PEM certificate (or CA) of the bundle server") from exc
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _redact(url: str) -> str:
    """The URL without credentials or query string (presigned URLs carry secrets there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return repr(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "..." if parts.query else "", ""))


def _failed(message: str, hint: str) -> BundleError:
    return BundleError(message, code=ErrorCode.BUNDLE_DOWNLOAD_FAILED, hint=hint)


def _mismatch(message: str) -> BundleError:
    return BundleError(message, code=ErrorCode.BUNDLE_CHECKSUM_MISMATCH,
                       hint="the file at that URL is not the bundle the command pinned: re-send the command with "
                            "the URL and sha256 that edgekit serve printed")


def _tls_failed(shown: str, exc: BaseException) -> BundleError:
    return _failed(f"cannot download {shown}: the server's TLS certificate was not accepted ({exc})",
                   "give the agent the server's certificate or CA (ca_file), or check the host name in the URL")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())

