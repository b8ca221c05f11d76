"""``edgekit flash BUNDLE --host user@device``: put a bundle on one board over SSH and install it.

Steps: hash the bundle locally; SFTP it to ``<remote_dir>/<sha256>.ekb.part``, resuming
from what an earlier, interrupted copy left there; hash the copy *on the device*
(``sha256sum``) and only then rename it to ``<sha256>.ekb``; run the device's
``edgekit-agent install ... --json --sha256 <sha>``, which verifies the signature,
health-checks the model and switches slots (or leaves the running model alone).
A ``<sha256>.ekb`` already in the upload folder is used only after ``sha256sum`` on
the device agrees with its name (otherwise it is replaced), and the agent checks
``--sha256`` again on its own private copy. Once the agent has answered (installed or
refused), the upload is removed from the device (the agent keeps its own copy in its
state directory) unless ``keep_upload``; it stays when the connection failed before an
answer, so running the same command again does not upload it again.

Host keys are checked like OpenSSH does by default: an unknown host is refused unless
``accept_new_host_key`` (OpenSSH's ``StrictHostKeyChecking=accept-new``), and a
*changed* host key is always refused. Host names are compared case-insensitively, as
OpenSSH does: the target's name is lowercased, and so are the (unhashed) names read
from known_hosts, so ``Jetson-01.local`` cannot pass as a new host when
``jetson-01.local`` is on record. Only paramiko and the standard library are used,
so nothing has to be installed on the device beyond the runtime and a POSIX shell with
``sha256sum`` (coreutils or busybox).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import posixpath
import re
import select
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import paramiko

from edgekit_runtime.fileio import sha256_file

from ..errors import EdgekitError, ExitCode

log = logging.getLogger(__name__)

SSH_PORT = 22
CHUNK = 32 * 1024  # paramiko's largest SFTP write request
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Raised by paramiko/sockets when the connection breaks mid-way; worth a reconnect.
_TRANSIENT = (OSError, EOFError, paramiko.SSHException)


class FlashError(EdgekitError):
    """The bundle could not be copied to the device or its install could not be run.

    A device that ran the install and refused the bundle is not an error: that result
    is returned (``ok: False``) with the agent's reason.
    """

    exit_code = ExitCode.DEVICE


class UnknownHostKeyError(FlashError):
    """The device's SSH host key is not in any known_hosts file (and accepting new keys was not asked for)."""

    def __init__(self, message: str, *, fingerprint: str, key_type: str):
        super().__init__(message)
        self.fingerprint = fingerprint
        self.key_type = key_type


class HostKeyChangedError(FlashError):
    """The device offered a host key other than the one on record: never accepted automatically."""


class SSHAuthError(FlashError):
    """The device refused our login (key not authorised, wrong user, unreadable identity)."""


class _Unreachable(FlashError):
    """The TCP connection or the SSH handshake failed (before authentication)."""


# ----------------------------------------------------------------------------- target
@dataclass(frozen=True)
class SSHTarget:
    """Where to log in: ``user@host:port``."""

    user: str
    host: str
    port: int = SSH_PORT

    def __post_init__(self) -> None:
        # OpenSSH lowercases the host name before it looks it up in (or adds it to) known_hosts
        object.__setattr__(self, "host", self.host.lower())

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH (and paramiko) file the host key under."""
        return self.host if self.port == SSH_PORT else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + ("" if self.port == SSH_PORT else f":{self.port}")


def parse_target(target: str, port: int | None = None) -> SSHTarget:
    """Parse ``user@host``, ``host``, ``user@host:port``, ``[v6]:port`` (and ``ssh://`` forms).

    The user defaults to the local user name and the port to 22; a ``port`` given both
    in ``target`` and as an argument must agree. The host is lowercased (as OpenSSH does).
    """
    text = target.strip()
    if text.startswith("ssh://"):
        text = text[len("ssh://"):].rstrip("/")
    if not text or any(c.isspace() for c in text):
        raise FlashError(f"bad SSH target {target!r}: expected user@host, host or user@host:port")
    user, at, rest = text.rpartition("@")
    if at and not user:
        raise FlashError(f"bad SSH target {target!r}: the user name before '@' is empty")
    port_text = None
    if rest.startswith("["):
        end = rest.find("]")
        host, tail = rest[1:end], rest[end + 1:]
        if end < 0 or (tail and not tail.startswith(":")):
            raise FlashError(f"bad SSH target {target!r}: write an IPv6 address as [addr] or [addr]:port")
        port_text = tail[1:] if tail else None
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    else:
        host = rest  # a plain name, or a bare IPv6 address (no port possible then)
    if not host:
        raise FlashError(f"bad SSH target {target!r}: no host name")
    parsed_port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise FlashError(f"bad SSH target {target!r}: port {port_text!r} is not a number from 1 to 65535")
        parsed_port = int(port_text)
    if port is not None and not 0 < port < 65536:
        raise FlashError(f"bad SSH port {port}: expected 1 to 65535")
    if parsed_port is not None and port is not None and parsed_port != port:
        raise FlashError(f"SSH target {target!r} names port {parsed_port} but port {port} was also given: "
                         "give the port once")
    return SSHTarget(user or getpass.getuser(), host, parsed_port or port or SSH_PORT)


# ----------------------------------------------------------------------------- host keys
def _default_known_hosts() -> Path:
    return Path("~/.ssh/known_hosts").expanduser()


def _describe(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


def _lowercase_names(hostkeys: paramiko.HostKeys) -> None:
    """Lowercase the plain host names of loaded known_hosts entries (OpenSSH matches them case-insensitively).

    Hashed names (``|1|salt|hash``) are left alone: OpenSSH hashes the lowercased name,
    which is what the lookup of a lowercased target computes.
    """
    for entry in hostkeys._entries:  # no public way to rename entries; paramiko has kept this list since 1.x
        entry.hostnames = [h if h.startswith("|1|") else h.lower() for h in entry.hostnames]


def _append_known_host(path: Path, name: str, key: paramiko.PKey) -> None:
    """Add one line the way ``ssh -o StrictHostKeyChecking=accept-new`` does (unhashed)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as fh:
        if fh.tell() > 0:
            with open(path, "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                if existing.read(1) != b"\n":
                    fh.write("\n")
        fh.write(f"{name} {key.get_name()} {key.get_base64()}\n")


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Called by paramiko only for a host with no key on record (a changed key raises BadHostKeyException)."""

    def __init__(self, target: SSHTarget, accept_new: bool, save_to: Path):
        self.target = target
        self.accept_new = accept_new
        self.save_to = save_to
        self.added: paramiko.PKey | None = None

    def missing_host_key(self, client, hostname, key):  # noqa: ARG002 - paramiko's signature
        if self.accept_new:
            _append_known_host(self.save_to, hostname, key)
            self.added = key
            log.warning("permanently added %s (%s) to %s", hostname, _describe(key), self.save_to)
            return
        port = "" if self.target.port == SSH_PORT else f"-p {self.target.port} "
        raise UnknownHostKeyError(
            f"the SSH host key of {hostname} is not known: it offered {_describe(key)}. "
            f"Compare that fingerprint with the device's own (on the device: ssh-keygen -lf "
            f"/etc/ssh/ssh_host_{key.get_name().removeprefix('ssh-').split('-')[0]}_key.pub), then either add it "
            f"(ssh-keyscan {port}{self.target.host} >> {self.save_to}) or pass --accept-new-host-key to trust "
            f"it on first use", fingerprint=key.fingerprint, key_type=key.get_name())


# ----------------------------------------------------------------------------- connection
def _load_identity(identity: Path) -> paramiko.PKey:
    path = Path(identity).expanduser()
    if not path.is_file():
        raise SSHAuthError(f"identity file {path} does not exist: pass the private key that the device's "
                           "authorized_keys accepts")
    try:
        return paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        raise SSHAuthError(f"identity {path} is protected by a passphrase: add it to your ssh-agent (ssh-add {path}) "
                           "and run without --identity") from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise SSHAuthError(f"cannot read identity {path} as an SSH private key ({exc})") from None


@dataclass
class _Settings:
    target: SSHTarget
    pkey: paramiko.PKey | None
    identity: Path | None
    known_hosts: Path | None
    accept_new_host_key: bool
    timeout: float


def _connect(s: _Settings) -> tuple[paramiko.SSHClient, paramiko.PKey | None]:
    """A logged-in client, and the host key it added to known_hosts (if any)."""
    client = paramiko.SSHClient()
    system = _default_known_hosts()
    # both files into one table, ~/.ssh/known_hosts first (it was paramiko's "system" table, looked up first);
    # paramiko never saves this table: a new key is appended by _HostKeyPolicy
    known = client.get_host_keys()
    for path in (system, s.known_hosts):
        try:
            if path is not None and path.is_file():
                known.load(str(path))
        except (OSError, paramiko.SSHException, paramiko.hostkeys.InvalidHostKey) as exc:
            raise FlashError(f"cannot read known_hosts file {path} ({type(exc).__name__}: {exc}): fix or remove "
                             f"the bad line (ssh-keygen -R HOST -f {path} rewrites the file)") from exc
    _lowercase_names(known)
    policy = _HostKeyPolicy(s.target, s.accept_new_host_key, s.known_hosts or system)
    client.set_missing_host_key_policy(policy)
    t = s.target
    try:
        client.connect(t.host, t.port, username=t.user, pkey=s.pkey,
                       allow_agent=s.pkey is None, look_for_keys=s.pkey is None,  # an explicit identity only
                       timeout=s.timeout, banner_timeout=s.timeout, auth_timeout=s.timeout,
                       channel_timeout=s.timeout)
    except FlashError:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        files = " or ".join(str(p) for p in dict.fromkeys([system, s.known_hosts]) if p is not None)
        raise HostKeyChangedError(
            f"the SSH host key of {t.known_hosts_name} has CHANGED: on record {_describe(exc.expected_key)}, "
            f"offered {_describe(exc.key)}. Someone may be intercepting the connection, or the device was "
            f"reinstalled. If you know why it changed, remove the old entry (ssh-keygen -R '{t.known_hosts_name}' "
            f"-f FILE, in {files}) and check the new fingerprint; edgekit never replaces a known host key") from None
    except paramiko.AuthenticationException as exc:
        client.close()
        how = f"identity {s.identity}" if s.identity else "your ssh-agent and default keys (~/.ssh/id_*)"
        raise SSHAuthError(
            f"{t} refused the SSH login with {how} ({exc}): authorise the public key on the device "
            f"(ssh-copy-id -i KEY.pub {'-p ' + str(t.port) + ' ' if t.port != SSH_PORT else ''}{t.user}@{t.host}), "
            "or pass --identity with a key it accepts") from None
    except _TRANSIENT as exc:
        transport = client.get_transport()
        handshake_done = transport is not None and transport.is_active() and not transport.is_authenticated()
        client.close()
        if handshake_done:  # e.g. "No authentication methods available": no key to offer at all
            how = f"identity {s.identity}" if s.identity else "your ssh-agent and default keys (~/.ssh/id_*)"
            raise SSHAuthError(f"cannot log in to {t} with {how} ({exc}): pass --identity with a key the device "
                               "accepts, or load one into ssh-agent") from None
        raise _Unreachable(f"cannot connect to {t} over SSH ({type(exc).__name__}: {exc}): check the address, "
                           "that the device is on and that sshd runs there") from exc
    return client, policy.added


def _alive(client: paramiko.SSHClient | None) -> bool:
    transport = client.get_transport() if client is not None else None
    return transport is not None and transport.is_active()


def _exec(client: paramiko.SSHClient, command: str, timeout: float) -> tuple[int, bytes, bytes]:
    """Run ``command`` on the device; ``(exit status, stdout, stderr)``. Raises TimeoutError."""
    channel = client.get_transport().open_session(timeout=timeout)
    try:
        channel.exec_command(command)
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        while True:
            # Read both streams as they come, so neither fills its window and stalls the other.
            while channel.recv_ready():
                out += channel.recv(65536)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
            if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                break
            if channel.closed:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{command!r} did not finish within {timeout:g} s")
            select.select([channel], [], [], min(remaining, 0.05))
        while channel.recv_ready():  # what arrived just before the exit status or the close
            out += channel.recv(65536)
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
        status = channel.recv_exit_status() if channel.exit_status_ready() else -1
        if status == -1 and not _alive(client):
            raise EOFError(f"the connection closed while {command!r} ran")
        return status, bytes(out), bytes(err)
    finally:
        channel.close()


def _tail(data: bytes, limit: int = 600) -> str:
    text = data.decode(errors="replace").strip()
    return text if len(text) <= limit else "..." + text[-limit:]


# ----------------------------------------------------------------------------- copy
def _remote_size(sftp: paramiko.SFTPClient, path: str) -> int | None:
    try:
        return sftp.stat(path).st_size
    except FileNotFoundError:
        return None


def _remote_sha256(client: paramiko.SSHClient, target: SSHTarget, path: str, timeout: float) -> str:
    status, out, err = _exec(client, f"sha256sum -- {shlex.quote(path)}", timeout)
    if status == 127:
        raise FlashError(f"{target} has no sha256sum command: install coreutils or busybox there")
    digest = out.split(maxsplit=1)[0].decode(errors="replace").lower() if out.strip() else ""
    if status != 0 or not _HEX64.fullmatch(digest):
        raise FlashError(f"sha256sum {path} failed on {target} (exit {status}): {_tail(err or out)}")
    return digest


def _makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """``mkdir -p -m 0755 path`` over SFTP.

    Readable by others on purpose: the agent that installs the upload runs as its own
    user (``edgekit``), and a bundle is signed, not secret. An existing folder keeps its
    mode (``firmware/bootstrap.sh`` makes it 1777).
    """
    missing = []
    current = path
    while current not in ("", "/", ".") and _remote_size(sftp, current) is None:
        missing.append(current)
        current = posixpath.dirname(current)
    for i, folder in enumerate(reversed(missing)):
        sftp.mkdir(folder, mode=0o755)


@dataclass
class _Copy:
    """What one flash has done so far; kept across reconnects."""

    local: Path
    sha256: str
    size: int
    final: str
    progress: Callable[[int, int], None] | None
    bytes_sent: int = 0
    resumed_from: int | None = None
    restarted_after_mismatch: bool = False
    already_on_device: bool = False
    done: bool = False

    @property
    def part(self) -> str:
        return self.final + ".part"


def _upload(sftp: paramiko.SFTPClient, c: _Copy, offset: int) -> None:
    with open(c.local, "rb") as src, sftp.open(c.part, "r+b" if offset else "wb") as dst:
        dst.set_pipelined(True)
        if offset:
            dst.seek(offset)
            src.seek(offset)
        done = offset
        while block := src.read(CHUNK):
            dst.write(block)
            done += len(block)
            c.bytes_sent += len(block)
            if c.progress is not None:
                c.progress(done, c.size)


def _copy_step(client: paramiko.SSHClient, target: SSHTarget, c: _Copy, remote_dir: str,
               hash_timeout: float, timeout: float) -> None:
    """Bring ``c.final`` onto the device with the right sha256; raises on connection trouble."""
    sftp = client.open_sftp()
    sftp.get_channel().settimeout(timeout)
    try:
        _makedirs(sftp, remote_dir)
        final_size = _remote_size(sftp, c.final)
        if final_size is not None:
            if final_size == c.size and _remote_sha256(client, target, c.final, hash_timeout) == c.sha256:
                c.already_on_device = c.resumed_from is None  # not uploaded by this flash
                c.done = True
                return
            sftp.remove(c.final)  # a damaged copy: replace it
        while True:
            offset = _remote_size(sftp, c.part) or 0
            if offset > c.size:
                offset = 0  # cannot be a prefix of this file; "wb" truncates it
            if c.resumed_from is None:
                c.resumed_from = offset
            if offset < c.size:
                _upload(sftp, c, offset)
            remote = _remote_sha256(client, target, c.part, hash_timeout)
            if remote == c.sha256:
                break
            if c.restarted_after_mismatch:
                sftp.remove(c.part)
                raise FlashError(f"the copy on {target} has sha256 {remote}, not {c.sha256}, even after uploading "
                                 "it again from the start: the device's storage (or something on the way) corrupts "
                                 "data; check its disk (dmesg, fsck) and free space")
            log.warning("the partial upload on %s has sha256 %s, not %s: uploading again from 0", target, remote,
                        c.sha256)
            c.restarted_after_mismatch = True
            sftp.remove(c.part)
        try:
            sftp.chmod(c.part, 0o644)  # whatever the login's umask: the agent's user must read it
            sftp.posix_rename(c.part, c.final)
        except OSError:  # a server without the posix-rename extension; the final name is free (removed above)
            sftp.rename(c.part, c.final)
        c.done = True
    finally:
        sftp.close()


# ----------------------------------------------------------------------------- install
def _agent_reply(stdout: bytes) -> dict | None:
    """The one JSON object the agent prints; tolerates noise (shell start-up files) before it."""
    text = stdout.decode(errors="replace").strip()
    candidates = [text] + [text[m.start():] for m in re.finditer(r"^\{", text, re.M)]
    for candidate in candidates:
        try:
            reply = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(reply, dict) and isinstance(reply.get("ok"), bool):
            return reply
    return None


def _install(client: paramiko.SSHClient, target: SSHTarget, remote_path: str, sha256: str, *, agent_command: str,
             agent_config: str, allow_downgrade: bool, timeout: float, shadow: bool = False) -> dict:
    try:
        argv = shlex.split(agent_command)
    except ValueError as exc:
        raise FlashError(f"cannot split --agent-command {agent_command!r} into words ({exc})") from None
    if not argv:
        raise FlashError("--agent-command is empty: pass the device's edgekit-agent command")
    argv += ["install", remote_path, "--config", agent_config, "--json", "--sha256", sha256]
    if allow_downgrade:
        argv.append("--allow-downgrade")
    if shadow:
        argv.append("--shadow")
    command = shlex.join(argv)
    try:
        status, out, err = _exec(client, command, timeout)
    except TimeoutError:
        raise FlashError(f"the install on {target} did not finish within {timeout:g} s; it may still be running: "
                         f"check `{agent_command} status --config {agent_config}` on the device, or allow more "
                         "time (--install-timeout)") from None
    except _TRANSIENT as exc:
        raise FlashError(f"lost the connection to {target} while it installed the bundle ({exc}); the agent "
                         f"may have finished: check `{agent_command} status --config {agent_config}` on the "
                         "device") from exc
    reply = _agent_reply(out)
    hint = ("pass --agent-command with the path of edgekit-agent on the device, or install the runtime there "
            "(firmware/bootstrap.sh)")
    if reply is None:
        if status in (126, 127):
            raise FlashError(f"`{argv[0]}` cannot be run on {target} (exit {status}: {_tail(err)}): {hint}")
        if b"unrecognized arguments" in err or b"invalid choice" in err:
            raise FlashError(f"the edgekit-agent on {target} is too old for `edgekit flash` ({_tail(err)}): update "
                             "the runtime there (firmware/bootstrap.sh)")
        raise FlashError(f"`{command}` on {target} exited {status} without a JSON reply "
                         f"(stderr: {_tail(err) or 'empty'}; stdout: {_tail(out) or 'empty'}): {hint}")
    if reply["ok"] and status != 0:
        raise FlashError(f"the agent on {target} reported ok but exited {status}: {_tail(err)}")
    if reply["ok"] and reply.get("sha256") not in (None, sha256):
        raise FlashError(f"the agent on {target} installed sha256 {reply['sha256']}, not the bundle sent ({sha256})")
    return reply


def _remove_upload(client: paramiko.SSHClient, target: SSHTarget, path: str, timeout: float) -> bool:
    """Remove the uploaded bundle from the device; True when it is gone. A failure is only logged."""
    try:
        sftp = client.open_sftp()
        try:
            sftp.get_channel().settimeout(timeout)
            try:
                sftp.remove(path)
            except FileNotFoundError:
                pass
            return True
        finally:
            sftp.close()
    except (*_TRANSIENT, TimeoutError) as exc:
        log.warning("could not remove the upload %s from %s (%s); remove it by hand", path, target, exc)
        return False


# ----------------------------------------------------------------------------- the whole flash
def flash_over_ssh(bundle: Path, target: str, *, port: int | None = None, identity: Path | None = None,
                   known_hosts: Path | None = None, accept_new_host_key: bool = False,
                   agent_command: str = "edgekit-agent", agent_config: str = "/etc/edgekit/agent.toml",
                   remote_dir: str = "/var/tmp/edgekit-uploads", allow_downgrade: bool = False, retries: int = 3,
                   timeout: float = 30.0, install_timeout: float = 600.0,
                   progress: Callable[[int, int], None] | None = None, retry_delay: float = 1.0,
                   keep_upload: bool = False, shadow: bool = False) -> dict[str, Any]:
    """Copy ``bundle`` to ``target`` over SSH (resumable, checked on the device) and install it there.

    ``target`` is ``user@host``, ``host`` or ``user@host:port`` (``[v6]:port``). Host keys
    come from ``~/.ssh/known_hosts`` plus ``known_hosts``; an unknown host is refused
    unless ``accept_new_host_key`` (the key is then appended to ``known_hosts``, or to
    ``~/.ssh/known_hosts``), a changed key always. ``identity`` is the only key tried when
    given; otherwise the ssh-agent and ``~/.ssh/id_*``. A connection that drops during
    the copy is re-made (up to ``retries`` times, ``retry_delay`` doubling) and the copy
    resumes. ``progress(bytes_on_device, total)`` is called as the upload advances.
    ``shadow``: the agent installs into the idle slot and health-checks without switching
    (``edgekit-agent install --shadow``), for ``edgekit-runtime serve`` to run it beside the active model.

    ``agent_command`` is split like a shell would (so ``"sudo -n edgekit-agent"`` works).
    A ``<sha256>.ekb`` already in ``remote_dir`` is used only if its sha256, computed on
    the device, matches. Once the agent has answered (ok or refused), the upload is
    removed from the device unless ``keep_upload`` (the agent keeps its own copy); when
    the connection or the agent failed before an answer it is left for the next run.
    Returns ``{"ok", "host", "remote_path", "sha256", "size", "bytes_sent", "resumed_from",
    "reconnects", "already_on_device", "restarted_after_mismatch", "upload_removed",
    "host_key", "copy_s", "install_s", "agent"}``; ``ok`` is False when the device
    refused the bundle (the agent's ``error`` says why). Raises :class:`FlashError` when
    the copy or the install could not be done at all.
    """
    bundle = Path(bundle)
    if not bundle.is_file():
        raise FlashError(f"bundle {bundle} does not exist")
    if retries < 0:
        raise FlashError(f"retries must be 0 or more, not {retries}")
    if not remote_dir or remote_dir.startswith(("-", "~")):
        raise FlashError(f"bad --remote-dir {remote_dir!r}: give an absolute path, or one relative to the "
                         "login's home (no '~')")
    settings = _Settings(parse_target(target, port), _load_identity(identity) if identity else None,
                         Path(identity).expanduser() if identity else None,
                         Path(known_hosts).expanduser() if known_hosts else None, accept_new_host_key, timeout)
    t = settings.target
    sha256, size = sha256_file(bundle), Path(bundle).stat().st_size  # the digest the agent checks against
    remote_dir = remote_dir.rstrip("/") or "/"
    copy = _Copy(bundle, sha256, size, posixpath.join(remote_dir, f"{sha256}.ekb"), progress)

    client, added = _connect(settings)  # a first failure is reported at once: probably a typo, not a blip
    host_key = client.get_transport().get_remote_server_key()
    try:
        reconnects = 0
        started = time.monotonic()
        while not copy.done:
            try:
                if client is None:
                    client, _ = _connect(settings)
                _copy_step(client, t, copy, remote_dir, install_timeout, timeout)
            except (*_TRANSIENT, _Unreachable) as exc:
                if _alive(client) and not isinstance(exc, (TimeoutError, EOFError)):
                    # The connection is fine: the device refused (permissions, disk full, read-only).
                    raise FlashError(f"copying {bundle.name} to {t}:{remote_dir} failed: {exc}; check that the "
                                     "folder is writable for this user and has room (df -h), or pass "
                                     "--remote-dir") from exc
                if reconnects >= retries:
                    times = f"{reconnects + 1} time{'s' if reconnects else ''}"
                    raise FlashError(f"lost the connection to {t} {times} while copying "
                                     f"({type(exc).__name__}: {exc}); run the same command again to resume "
                                     "from what reached the device") from exc
                reconnects += 1
                delay = retry_delay * 2 ** (reconnects - 1)
                log.warning("connection to %s lost while copying (%s); reconnecting in %.1f s (%d/%d)", t, exc,
                            delay, reconnects, retries)
                if client is not None:
                    client.close()
                    client = None
                time.sleep(delay)
        copy_s = time.monotonic() - started
        started = time.monotonic()
        reply = _install(client, t, copy.final, sha256, agent_command=agent_command, agent_config=agent_config,
                         allow_downgrade=allow_downgrade, timeout=install_timeout, shadow=shadow)
        install_s = time.monotonic() - started
        # the agent answered: it has (or refused) its own copy, so ours is no longer needed
        upload_removed = False if keep_upload else _remove_upload(client, t, copy.final, timeout)
    finally:
        if client is not None:
            client.close()
    return {"ok": reply["ok"], "host": str(t), "remote_path": copy.final, "sha256": sha256, "size": size,
            "bytes_sent": copy.bytes_sent, "resumed_from": copy.resumed_from, "reconnects": reconnects,
            "already_on_device": copy.already_on_device, "restarted_after_mismatch": copy.restarted_after_mismatch,
            "upload_removed": upload_removed,
            "host_key": {"type": host_key.get_name(), "fingerprint": host_key.fingerprint,
                         "added_to": str(settings.known_hosts or _default_known_hosts()) if added else None},
            "copy_s": round(copy_s, 3), "install_s": round(install_s, 3), "agent": reply}
