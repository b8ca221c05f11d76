"""A throwaway PostgreSQL server in a temporary folder, for the tests and benchmarks of the PostgreSQL fleet store.

:class:`TempPostgres` runs the distribution's own ``initdb`` and ``postgres``
(Debian package ``postgresql``: ``/usr/lib/postgresql/<version>/bin``) on a free
loopback port, with its unix socket in the same folder, creates one database and
gives its URL. Nothing outside the folder is touched, and stopping it removes
the folder. ``initdb`` refuses to run as root, so under root (CI) the folder is
handed to the unprivileged ``postgres`` account the package creates and the server
runs as that account.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import EdgekitError

log = logging.getLogger("edgekit.fleet.pgserver")

INSTALL_HINT = "apt-get install postgresql (`make test` does it when run as root)"


class PostgresNotFound(EdgekitError):
    """No PostgreSQL server binaries on this machine."""


def find_bindir() -> Optional[Path]:
    """The folder holding ``initdb``/``pg_ctl``/``postgres``: ``$EDGEKIT_PG_BINDIR``, the newest
    ``/usr/lib/postgresql/<version>/bin`` (Debian keeps them off the PATH), or the PATH."""
    env = os.environ.get("EDGEKIT_PG_BINDIR")
    if env:
        return Path(env) if (Path(env) / "initdb").exists() else None

    def version(path: str) -> tuple:
        name = Path(path).parents[1].name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _unprivileged_user() -> Optional[str]:
    import pwd

    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


class TempPostgres:
    """``with TempPostgres() as pg: pg.url`` — a fresh cluster with one database, removed afterwards.

    ``durable=False`` (the default) turns fsync off: the cluster is thrown away,
    so a crash of this machine cannot lose anything worth keeping, and the tests
    do not wait for the disk. Pass ``durable=True`` to measure what a real
    server's commits cost.
    """

    def __init__(self, dbname: str = "edgekit", user: str = "edgekit", durable: bool = False,
                 bindir: Optional[Path] = None, settings: Optional[dict[str, Any]] = None):
        self.bindir = Path(bindir) if bindir else find_bindir()
        if self.bindir is None:
            raise PostgresNotFound(f"PostgreSQL's server programs (initdb, postgres) are not installed: {INSTALL_HINT}")
        self.dbname = dbname
        self.user = user
        self.durable = durable
        self.settings = dict(settings or {})
        self.host = "127.0.0.1"
        self.port = 0
        self.root: Optional[Path] = None
        self._runas: list[str] = []

    # -- paths ---------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        assert self.root is not None, "not started"
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "not started"
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        """``postgresql://user@127.0.0.1:port/dbname`` (trust authentication on loopback: no password)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.root and self.log_path.exists() else ""

    # -- lifecycle -----------------------------------------------------------------------
    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self._runas, *args], capture_output=True, text=True, check=check,
                              stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 60.0) -> "TempPostgres":
        # (not pytest's tmp_path: its parents are private to root, the server's account could not enter them)
        self.root = Path(tempfile.mkdtemp(prefix="edgekit-pg-"))
        if os.geteuid() == 0:
            account = _unprivileged_user()
            if account is None:
                raise PostgresNotFound("running as root, and there is no `postgres` or `nobody` account to run "
                                       f"PostgreSQL as (initdb refuses root): {INSTALL_HINT}")
            shutil.chown(self.root, account, account)
            self._runas = ["runuser", "-u", account, "--"]
        try:
            out = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                            "-E", "UTF8", "--locale=C", "--no-instructions", "--no-sync", check=False)
            if out.returncode != 0:
                raise PostgresNotFound(f"initdb failed ({out.returncode}): {(out.stderr or out.stdout)[-2000:]}")
            settings = {"listen_addresses": self.host, "unix_socket_directories": str(self.root),
                        "max_connections": 100, "shared_buffers": "128MB", "logging_collector": "off",
                        **({} if self.durable else {"fsync": "off", "synchronous_commit": "off",
                                                     "full_page_writes": "off"}),
                        **self.settings}
            for attempt in range(3):  # a free port can be taken by someone else before the server binds it
                self.port = free_port(self.host)
                with open(self.data / "postgresql.auto.conf", "w") as conf:
                    for key, value in {**settings, "port": self.port}.items():
                        conf.write(f"{key} = '{value}'\n")
                out = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path),
                                "-w", "-t", str(int(timeout)), "start", check=False)
                if out.returncode == 0:
                    break
                if "could not bind" not in self.log() or attempt == 2:
                    raise PostgresNotFound(f"PostgreSQL did not start: {out.stderr[-1000:]}\n{self.log()[-3000:]}")
            self._create_database()
        except BaseException:
            self.stop()
            raise
        log.info("PostgreSQL %s on %s:%d in %s", self.bindir, self.host, self.port, self.root)
        return self

    def _create_database(self) -> None:
        out = self._run(str(self.bindir / "createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user,
                        self.dbname, check=False)
        if out.returncode != 0:
            raise PostgresNotFound(f"createdb {self.dbname} failed: {out.stderr.strip()}")

    def restart(self, timeout: float = 60.0) -> None:
        """Stop the server (fast: sessions are cut) and start it again on the same port and data."""
        out = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-m", "fast",
                        "-w", "-t", str(int(timeout)), "restart", check=False)
        if out.returncode != 0:
            raise PostgresNotFound(f"PostgreSQL did not restart: {out.stderr[-1000:]}\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove the folder."""
        if self.root is None:
            return
        if (self.data / "postmaster.pid").exists():
            out = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30",
                            "stop", check=False)
            if out.returncode != 0:
                log.warning("pg_ctl stop: %s", out.stderr.strip())
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", check=False)
        for _ in range(50):  # the postmaster may take a moment to let go of its files
            try:
                shutil.rmtree(self.root)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        self.root = None

    def __enter__(self) -> "TempPostgres":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
