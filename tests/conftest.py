"""Fixtures shared by every test directory: keys, a trained digits CNN (built once per session), and a
throwaway PostgreSQL server (``pg_url``: a database of its own per test)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("host")


# What a distribution is built from; anything else in the work tree (.venv, build outputs, tests)
# stays behind, so a test that builds a wheel never writes build/ or *.egg-info into the sources.
DISTRIBUTION_SOURCES = ("pyproject.toml", "README.md", "edgekit", "targets", "runtime/pyproject.toml",
                        "runtime/edgekit_runtime")


@pytest.fixture
def source_copy(tmp_path) -> Path:
    """A copy of the distributions' sources (no caches or build outputs) in a temp dir."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    dest = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for rel in DISTRIBUTION_SOURCES:
        src = repo / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=skip)
        elif src.exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="session")
def keys(workdir) -> dict[str, Path]:
    from edgekit.signing import generate_keypair

    priv, pub, key_id = generate_keypair(workdir / "keys")
    return {"private": priv, "public": pub, "key_id": key_id}


@pytest.fixture(scope="session")
def signing_key(keys):
    from edgekit.signing import load_private_key

    return load_private_key(keys["private"])


@pytest.fixture(scope="session")
def digits_checkpoint(workdir) -> Path:
    """The digits CNN trained briefly (seeded); ~97–99 % top-1."""
    import torch

    from edgekit.data import digits
    from edgekit.models.digits_cnn import build
    from edgekit.train_minimal import train_classifier

    torch.manual_seed(0)
    s = digits.splits()
    model, acc = train_classifier(build(width=16), digits.to_tensor(s["train"].images), s["train"].labels,
                                  digits.to_tensor(s["val"].images), s["val"].labels, epochs=8)
    assert acc > 93, f"training the test model failed ({acc:.1f} %)"
    path = workdir / "digits_cnn.pt"
    torch.save(model.state_dict(), path)
    return path


# ----------------------------------------------------------------------------- MQTT broker
# A real Mosquitto (Debian package `mosquitto`) per test, on a free loopback port with its
# own config file in the test's tmp dir. `make test` installs the package when run as root.
class MosquittoBroker:
    """One mosquitto process; ``lines`` are appended to its config (password/ACL/TLS listeners)."""

    def __init__(self, root: Path, lines: tuple[str, ...] = (), anonymous: bool = True,
                 tls_port: bool = False, base: bool = True):
        import getpass
        import shutil

        from edgekit.fleet.broker import free_port

        self.binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)
        if self.binary is None:
            import os

            why = ("mosquitto is not installed (apt-get install mosquitto mosquitto-clients; "
                   "`make test` does it when run as root)")
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(why)  # CI must run the broker tests, never skip them
            pytest.skip(why)

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls_port = free_port() if tls_port else None
        self.config_path = root / "mosquitto.conf"
        self.log_path = root / "mosquitto.log"
        ours = [
            "per_listener_settings false",
            f"allow_anonymous {'true' if anonymous else 'false'}",
            "max_inflight_messages 1000", "max_queued_messages 100000",
            "persistence false",
            f"listener {self.port} {self.host}",
        ] if base else []
        self.lines = [
            f"user {getpass.getuser()}", "log_dest stderr", "log_type error", "log_type warning", "log_type notice",
            *ours,
            *[line.replace("{port}", str(self.port)).replace("{tls_port}", str(self.tls_port))
              .replace("{root}", str(root)) for line in lines],
        ]
        self.config_path.write_text("\n".join(self.lines) + "\n")
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        import subprocess
        import time

        from edgekit.fleet.broker import port_open

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config_path)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        for port in [self.port] + ([self.tls_port] if self.tls_port else []):
            while not port_open(self.host, port):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not start:\n{self.log()}")
                time.sleep(0.02)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def mosquitto(tmp_path):
    """Factory: ``mosquitto(lines=(...), anonymous=True, tls_port=False, base=True)`` → a started broker.

    ``lines`` are appended to the config and may use ``{port}``, ``{tls_port}``
    and ``{root}`` (the broker's folder). ``base=False``: only ``lines`` (plus
    logging and the user to run as), e.g. a production config with its
    listeners moved to ``{port}``/``{tls_port}``. Every broker started is
    stopped at teardown.
    """
    started: list[MosquittoBroker] = []

    def start(lines: tuple[str, ...] = (), anonymous: bool = True, tls_port: bool = False,
              base: bool = True) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / f"mosquitto-{len(started)}", tuple(lines), anonymous, tls_port, base)
        started.append(broker)
        return broker.start()

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def mqtt_broker(mosquitto) -> MosquittoBroker:
    """An anonymous Mosquitto on a free loopback port (raised in-flight/queue limits, no persistence)."""
    return mosquitto()


# ----------------------------------------------------------------------------- PostgreSQL
# One throwaway PostgreSQL server per test session (Debian package `postgresql`, installed by `make test` when
# run as root, like Mosquitto), and a fresh database per test: `pg_url` is its postgresql:// URL.
@pytest.fixture(scope="session")
def pg_server():
    import os

    from edgekit.fleet.pgserver import PostgresNotFound, TempPostgres

    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("psycopg is a main dependency: pip install -e . again")
    try:
        server = TempPostgres().start()
    except PostgresNotFound as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(exc))  # CI must run the PostgreSQL store tests, never skip them
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server, request):
    """A postgresql:// URL of an empty database of its own on the session's server."""
    import re

    import psycopg

    name = "t_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50]
    admin = f"postgresql://{pg_server.user}@{pg_server.host}:{pg_server.port}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://{pg_server.user}@{pg_server.host}:{pg_server.port}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
