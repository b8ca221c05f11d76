"""How much memory a model takes on the device: peak resident set size (RSS) of a process that runs it.

Design: each bundle is measured in a **child process of its own** (``python -m
edgekit_runtime.memory``) that imports the runtime, records its RSS (the baseline
interpreter: Python, numpy, OpenCV, the runtime), loads the bundle (verify, extract, the
engine library's import, model compilation), records RSS again, then warms the model up and
runs single-stream queries and a few offline batches of the benchmark's size, and reports its
high-water mark. Why a child and not the benchmark's own process:

* the host CLI has imported typer, rich and often much more, so its RSS says nothing about a
  device; a fresh interpreter that imports only what ``edgekit-runtime`` imports does;
* the kernel's high-water mark (``VmHWM``) only goes up, so with ``--compare`` the second
  model's peak would include the first one's; in its own process each model's peak is its own;
* the child runs after the timed benchmark, so measuring memory never competes with it for cores.

Figures come from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), else ``resource.getrusage``'s
``ru_maxrss`` (peak only). RSS counts host memory; GPU memory (TensorRT on a discrete GPU,
NvMap buffers on a Jetson) is not in it, and the result says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .api import load
from .bench import BenchSettings, exercise, synthetic_inputs
from .contract.errors import EngineError, ErrorCode, RuntimeErrorBase
from .keyring import Keyring

MIB = 1024 * 1024
# Enough queries for the engine's arenas and caches to reach their steady size; the latency
# figures come from the timed run, not from here.
PROBE_QUERIES = 50
PROBE_OFFLINE_BATCHES = 3


def rss_mib() -> dict[str, float | None]:
    """This process's current and peak RSS in MiB (``current`` is None where only the peak is known)."""
    try:
        fields = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024 / MIB  # kB
        if "VmRSS" in fields and "VmHWM" in fields:
            return {"current": fields["VmRSS"], "peak": fields["VmHWM"]}
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS
    return {"current": None, "peak": peak / MIB if sys.platform == "darwin" else peak * 1024 / MIB}


def _source() -> str:
    return "/proc/self/status VmRSS/VmHWM" if Path("/proc/self/status").exists() else "getrusage ru_maxrss"


def probe(bundle: str, keyring: Sequence[str] | None, threads: int | None, engine: str | None,
          warmup: int, queries: int, offline_batch: int | None, images: Sequence[str] | None,
          seed: int = 0) -> dict[str, Any]:
    """The child's work (call it only in a fresh process): RSS before load, after load, and at the end."""
    baseline = rss_mib()  # this module's imports (the runtime, numpy, OpenCV) are in it; the engine's are not
    ring = Keyring.from_paths(*keyring) if keyring else None
    with load(bundle, keyring=ring, threads=threads, engine=engine) as model:
        loaded = rss_mib()
        samples: list[Any] = list(images) if images else synthetic_inputs(model, 64, seed)
        s = BenchSettings(warmup=warmup, min_queries=queries, min_duration_s=0.0, max_duration_s=60.0,
                          offline_batch=offline_batch, offline_min_batches=PROBE_OFFLINE_BATCHES, seed=seed)
        workload = exercise(model, samples, s)
        end = rss_mib()
    before = baseline["current"] if baseline["current"] is not None else baseline["peak"]
    after = loaded["current"] if loaded["current"] is not None else loaded["peak"]
    return {
        "baseline_mib": round(before, 2),
        "after_load_mib": round(after, 2),
        "peak_mib": round(end["peak"], 2),
        "load_mib": round(after - before, 2),
        "source": _source(),
        "method": "child process: import runtime, load, warm-up, single-stream queries, offline batches",
        "workload": workload,
        "note": "host RSS only: GPU memory (TensorRT, Jetson NvMap) is not counted",
    }


def _write_keyring(keys: dict[str, Any], directory: Path) -> None:
    """The trusted public keys as ``*.pub`` files, so the child verifies with the same keyring as its parent."""
    from cryptography.hazmat.primitives import serialization

    for key_id, key in keys.items():
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (directory / f"{key_id}.pub").write_bytes(pem)


def measure(bundle: str | os.PathLike, keyring: Keyring | None, *, threads: int | None = None,
            engine: str | None = None, warmup: int = 20, queries: int = PROBE_QUERIES,
            offline_batch: int | None = None, images: Sequence[str | os.PathLike] | None = None, seed: int = 0,
            timeout_s: float = 600.0) -> dict[str, Any]:
    """Measure ``bundle``'s memory in a child process (see the module docstring); JSON-ready MiB figures.

    ``keyring`` is the :class:`~.keyring.Keyring` the caller verified the bundle with (or
    None for the default one). A child that fails raises its own runtime error; one the
    kernel killed (out of memory) or that overran ``timeout_s`` is an :class:`EngineError`.
    """
    import edgekit_runtime

    package_root = str(Path(edgekit_runtime.__file__).resolve().parents[1])
    env = dict(os.environ)
    # The child must import this same runtime, also where it is on sys.path only (a source checkout).
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory(prefix="edgekit-memory-") as tmp:
        cmd = [sys.executable, "-m", "edgekit_runtime.memory", str(bundle), "--warmup", str(warmup),
               "--queries", str(queries), "--seed", str(seed)]
        if keyring is not None:
            _write_keyring(keyring.keys, Path(tmp))
            cmd += ["--keyring", tmp]
        if threads:
            cmd += ["--threads", str(threads)]
        if engine:
            cmd += ["--engine", engine]
        if offline_batch:
            cmd += ["--batch", str(offline_batch)]
        if images:  # a file, not argv: an image folder can outgrow the command line
            listing = Path(tmp) / "images.txt"
            listing.write_text("\n".join(str(p) for p in images))
            cmd += ["--images-from", str(listing)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise EngineError(f"the memory probe of {Path(bundle).name} ran past {timeout_s:.0f} s",
                              code=ErrorCode.ENGINE_INFERENCE_FAILED) from None
    if proc.returncode < 0:
        raise EngineError(f"the memory probe of {Path(bundle).name} was killed by signal {-proc.returncode}"
                          + (" (the kernel's out-of-memory killer?)" if proc.returncode == -9 else ""),
                          code=ErrorCode.ENGINE_INFERENCE_FAILED,
                          hint="check the device's free memory (dmesg names the OOM killer's victims)")
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        raise EngineError(f"the memory probe of {Path(bundle).name} failed (exit {proc.returncode}): "
                          f"{proc.stderr.strip()[-2000:]}", code=ErrorCode.ENGINE_INFERENCE_FAILED) from None
    if not doc.get("ok"):
        err = doc["error"]
        raise RuntimeErrorBase(err["message"], code=ErrorCode(err["code"]), hint=err.get("hint"))
    return doc["memory"]


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m edgekit_runtime.memory BUNDLE [--images-from FILE]``; one JSON document on stdout."""
    p = argparse.ArgumentParser(prog="python -m edgekit_runtime.memory")
    p.add_argument("bundle")
    p.add_argument("--images-from", type=Path, help="a file naming one image per line")
    p.add_argument("--keyring", action="append")
    p.add_argument("--threads", type=int)
    p.add_argument("--engine")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--queries", type=int, default=PROBE_QUERIES)
    p.add_argument("--batch", type=int)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    images = args.images_from.read_text().splitlines() if args.images_from else None
    # Inference libraries write notices to file descriptor 1 from C++; keep the real stdout for the
    # one JSON document and send everything else to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        mem = probe(args.bundle, args.keyring, args.threads, args.engine, args.warmup, args.queries, args.batch,
                    images, args.seed)
        doc: dict[str, Any] = {"ok": True, "memory": mem}
    except RuntimeErrorBase as exc:
        doc = {"ok": False, "error": exc.to_event()}
    out.write(json.dumps(doc) + "\n")
    out.close()
    return 0 if doc["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
