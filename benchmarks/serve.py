"""``edgekit-runtime serve``: what dynamic batching buys, and what the HTTP endpoint costs.

The model is torchvision's mobilenet_v2 (random weights, BatchNorm statistics re-estimated on
photo crops), compiled INT8 for ``onnxruntime-cpu`` by ``benchmarks/common.py``'s build (the
fidelity gate reports rather than refuses for random weights; throughput does not depend on them).
The server runs as its own process (``python -m edgekit_runtime.cli serve``), the clients in this
one, on loopback.

1. **Batching**: ``--clients`` closed-loop clients (each sends its next request when the last is
   answered) for ``--seconds``, with binary FP32 tensors (tritonclient's wire format), against the
   server started with ``--max-batch 1`` and with ``--max-batch B`` (``--max-delay-ms D``). Reported:
   requests/s, client-side p50/p99, the server's own batch sizes and per-batch inference p50/p99 (from
   ``/metrics``), and the throughput ratio.
2. **Endpoint overhead, one client**: the same image as JPEG bytes through ``POST .../infer``
   (``Content-Type: image/jpeg``: decode, pre-process, inference, top-k, JSON) and through
   ``Model.predict`` on the decoded image in this process, alternating blocks of queries; likewise a tensor
   through binary ``infer`` and ``Model.run``. Reported: p50 of each and the difference.

    .venv/bin/python benchmarks/serve.py [--clients 8] [--seconds 20] [--threads 2]

Writes ``--out``/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402

MODEL, TARGET = "mobilenet_v2", "onnxruntime-cpu"
STREAM_MODEL = "resnet50"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per server configuration")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=common.usable_cores(), help="inference threads of the server")
    p.add_argument("--open-loop-share", type=float, default=0.6,
                   help="open-loop arrival rate, as a share of --max-batch 1's closed-loop throughput")
    p.add_argument("--overhead-queries", type=int, default=400, help="queries per path in the one-client test")
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    p.add_argument("--stream-seconds", type=float, default=60.0, help="length of the 30 fps video for stream (0: skip)")
    p.add_argument("--only-stream", action="store_true", help="run the stream part only (keep the rest of the JSON)")
    p.add_argument("--only-engine", action="store_true",
                   help="run the engine-scaling part only: rows/s by batch size for 1 and --threads threads, spin-wait "
                        "on and off (keep the rest of the JSON)")
    p.add_argument("--rebuild", action="store_true", help="compile even when the cached bundle exists")
    p.add_argument("--markdown-only", action="store_true")
    return p.parse_args(argv)


class ServerProcess:
    def __init__(self, bundle: Path, pub: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "edgekit_runtime.cli", "serve", str(bundle), "--port", "0",
                                      "--keyring", str(pub), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=common.REPO)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the server did not start: {self.proc.stderr.read()[-2000:]}")
        info = json.loads(line)
        self.port = int(info["listening"].rsplit(":", 1)[1])
        self.name = next(iter(info["models"]))

    def metrics(self) -> str:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        c.request("GET", "/metrics")
        return c.getresponse().read().decode()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def build_bundle(threads: int, rebuild: bool, arch: str = MODEL, precision: str = "int8") -> dict[str, Any]:
    """``benchmarks/common.py``'s build of ``arch``, plus the ImageNet pre-processing preset (what
    ``edgekit compile --preprocess imagenet`` adds), so the bundle takes images; cached beside the others."""
    from edgekit.build.pipeline import compile_model
    from edgekit.cli.compile import preprocess_flags
    from edgekit.config import load_build
    from edgekit.signing import load_private_key

    out = common.CACHE / "bundles" / f"{arch}-{TARGET}-{precision}-images.ekb"
    report = out.with_suffix(".report.json")
    if out.exists() and report.exists() and not rebuild:
        log(f"reusing {out.relative_to(common.REPO)}")
        return {"bundle": out, "report": json.loads(report.read_text())}
    data, keys = common.ensure_data(log), common.ensure_keys()
    ckpt = common.ensure_checkpoint(arch, threads, log)
    pre = preprocess_flags("imagenet", None, None, None, None, None, [1, 3, common.SIZE, common.SIZE])
    pre.pop("_shape", None)
    pre.pop("_input_shape", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = load_build(None, {
        "model.source": "benchmarks.common:make_model", "model.kwargs": {"arch": arch},
        "model.checkpoint": str(common.REPO / ckpt["checkpoint"]), "model.name": arch,
        "model.input_shape": [1, 3, common.SIZE, common.SIZE], "target": TARGET,
        "calibration.source": str(data["calib"]), "accuracy": {"max_accuracy_drop": None},
        # random weights: the fidelity gate reports, the latency gate is not asked (throughput is the subject)
        "fidelity": {"min_cosine": None}, "latency": {"on_slower": "keep_int8"},
        "preprocess": pre, "output": str(out), **({"quantize": {"enabled": False}} if precision == "fp32" else {})})
    log(f"compiling {arch} {precision} for {TARGET} with ImageNet pre-processing")
    result = compile_model(cfg, load_private_key(keys["private"]))
    return {"bundle": out, "report": result.report}


def tensor_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                "Content-Type": "application/octet-stream"}


def post(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    conn.request("POST", path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data[:300]!r}")
    return data


def load_test(server: ServerProcess, body: bytes, headers: dict[str, str], clients: int, seconds: float
              ) -> dict[str, Any]:
    """Closed-loop clients for ``seconds`` after a 2 s warm-up; latencies of the measured window only."""
    path = f"/v2/models/{server.name}/infer"
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start_at = time.monotonic() + 2.0
    stop_at = start_at + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        while True:
            t = time.monotonic()
            if t >= stop_at:
                break
            try:
                post(conn, path, body, headers)
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                errors.append(str(exc))
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                continue
            if t >= start_at:
                lat[i].append(time.monotonic() - t)

    before = server.metrics()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server.metrics()
    allv = sorted(v for per in lat for v in per)
    return {"requests": len(allv), "errors": len(errors), "error_examples": errors[:3],
            "throughput_rps": len(allv) / seconds, "latency_ms": _pcts(allv),
            "server": _server_side(before, after, server.name)}


def open_loop(server: ServerProcess, body: bytes, headers: dict[str, str], rate: float, seconds: float,
              connections: int = 16, seed: int = 0) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` requests/s for ``seconds`` (after 2 s of warm-up): a load below saturation,
    as independent devices or cameras make it. Latency counts from each request's scheduled time, so a client
    that could not send on time is not hidden (no coordinated omission)."""
    import queue as queue_mod

    path = f"/v2/models/{server.name}/infer"
    rng = np.random.default_rng(seed)
    start = time.monotonic() + 1.0
    times, t = [], 0.0
    while t < seconds + 2.0:
        t += rng.exponential(1.0 / rate)
        times.append(start + t)
    todo: queue_mod.Queue = queue_mod.Queue()
    for at in times:
        todo.put(at)
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        while True:
            try:
                at = todo.get_nowait()
            except queue_mod.Empty:
                return
            wait = at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                post(conn, path, body, headers)
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(str(exc))
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                continue
            if at >= start + 2.0:
                with lock:
                    lat.append(time.monotonic() - at)

    before = server.metrics()
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    after = server.metrics()
    return {"rate_rps": rate, "requests": len(lat), "errors": len(errors), "latency_ms": _pcts(sorted(lat)),
            "server": _server_side(before, after, server.name)}


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values) * 1000
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def _sample(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()) \
                and line.split("}")[0].count("=") == want.count("="):
            return float(line.rsplit(" ", 1)[1])
    return None


def _server_side(before: str, after: str, model: str) -> dict[str, Any]:
    """Batches run and rows in them during the window (counter differences), per-batch inference quantiles."""
    count = (_sample(after, "edgekit_serve_batch_size_count", model=model) or 0) - (
        _sample(before, "edgekit_serve_batch_size_count", model=model) or 0)
    rows = (_sample(after, "edgekit_serve_batch_size_sum", model=model) or 0) - (
        _sample(before, "edgekit_serve_batch_size_sum", model=model) or 0)
    q = {f"p{int(float(qq) * 100)}": 1000 * (_sample(after, "edgekit_serve_stage_seconds", model=model,
                                                     stage="inference", quantile=qq) or float("nan"))
         for qq in ("0.5", "0.99")}
    queue = {f"p{int(float(qq) * 100)}": 1000 * (_sample(after, "edgekit_serve_stage_seconds", model=model,
                                                         stage="queue", quantile=qq) or float("nan"))
             for qq in ("0.5", "0.99")}
    total = {f"p{int(float(qq) * 100)}": 1000 * (_sample(after, "edgekit_serve_stage_seconds", model=model,
                                                         stage="total", quantile=qq) or float("nan"))
             for qq in ("0.5", "0.99")}
    return {"batches": int(count), "rows": int(rows), "mean_batch": rows / count if count else None,
            "inference_per_batch_ms": q, "queue_ms": queue, "server_total_ms": total}


def overhead(server: ServerProcess, bundle: Path, pub: Path, threads: int, queries: int) -> dict[str, Any]:
    """One client: the endpoint against the in-process API, alternating blocks of 20 queries."""
    import cv2

    import edgekit_runtime

    photo = common.random_crops(common.sample_photos(), 1, 7)[0]
    ok, jpeg = cv2.imencode(".jpg", photo[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    jpeg = jpeg.tobytes()
    path = f"/v2/models/{server.name}/infer"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    out: dict[str, Any] = {"jpeg_bytes": len(jpeg), "image": list(photo.shape)}
    with edgekit_runtime.load(bundle, keyring=pub, threads=threads) as model:
        x = model.preprocess([photo])
        body, headers = tensor_body(x)
        paths = {
            "http_image": lambda: post(conn, path, jpeg, {"Content-Type": "image/jpeg"}),
            "predict_image": lambda: model.predict([cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8),
                                                                             cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)]),
            "http_tensor": lambda: post(conn, path, body, headers),
            "run_tensor": lambda: model.run(x),
        }
        times: dict[str, list[float]] = {k: [] for k in paths}
        for fn in paths.values():  # warm-up
            for _ in range(20):
                fn()
        block = 20
        for b in range(queries // block):
            order = list(paths) if b % 2 == 0 else list(reversed(paths))
            for k in order:
                fn = paths[k]
                for _ in range(block):
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        out[k] = _pcts(v)
    out["image_added_p50_ms"] = out["http_image"]["p50"] - out["predict_image"]["p50"]
    out["tensor_added_p50_ms"] = out["http_tensor"]["p50"] - out["run_tensor"]["p50"]
    return out


def engine_ceiling(bundle: Path, pub: Path, threads: int, max_batch: int, rounds: int = 30,
                   spin_wait: bool | None = None, sizes: tuple[int, ...] = ()) -> dict[str, Any]:
    """The engine alone, in this process: rows/s at batch 1 and at ``max_batch`` (and ``sizes``; rounds of the
    same rows, the order rotating), the most any server's batching can gain on this machine."""
    import edgekit_runtime

    batches = sorted({1, max_batch, *sizes})
    rows_per_round = max(batches)
    x = np.random.default_rng(0).normal(size=(rows_per_round, 3, common.SIZE, common.SIZE)).astype(np.float32)
    times: dict[int, list[float]] = {n: [] for n in batches}
    with edgekit_runtime.load(bundle, keyring=pub, threads=threads, spin_wait=spin_wait) as model:
        for _ in range(3):
            for n in batches:
                model.run(x[:n])
        for r in range(rounds):
            for n in batches[r % len(batches):] + batches[:r % len(batches)]:
                t = time.perf_counter()
                for _ in range(rows_per_round // n):
                    model.run(x[:n])
                times[n].append((time.perf_counter() - t) / (rows_per_round // n * n))
    rows = {n: 1.0 / statistics.median(v) for n, v in times.items()}
    return {**{f"rows_per_s_batch_{n}": rows[n] for n in batches}, "ratio": rows[max_batch] / rows[1]}


def engine_scaling(bundle: Path, pub: Path, threads: int, max_batch: int) -> list[dict[str, Any]]:
    """:func:`engine_ceiling` for one thread and ``threads``, spin-wait on and off: where batching's gain comes from
    (one thread: the per-row cost alone; several: the thread pool's idle time that a bigger batch fills)."""
    out = []
    for n_threads in sorted({1, threads}):
        for spin in (True, False):
            log(f"engine scaling: {n_threads} thread(s), spin-wait {'on' if spin else 'off'}")
            out.append({"threads": n_threads, "spin_wait": spin,
                        **engine_ceiling(bundle, pub, n_threads, max_batch, rounds=12, spin_wait=spin,
                                         sizes=(4, 16, 32))})
    return out


def stream_run(threads: int, rebuild: bool, seconds: float) -> dict[str, Any]:
    """``edgekit-runtime stream`` (the CLI, as a device runs it) on a 30 fps 640×480 file of ``seconds``
    through resnet50 FP32 on one thread — a model slower than a frame — sampling the process's resident
    memory every second."""
    import tempfile

    import cv2

    built = build_bundle(threads, rebuild, STREAM_MODEL, "fp32")
    pub = common.ensure_keys()["public"]
    with tempfile.TemporaryDirectory() as d:
        clip = Path(d) / "clip.avi"
        writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (640, 480))
        photos = common.sample_photos()
        for i in range(int(30 * seconds)):
            frame = cv2.resize(photos[(i // 90) % len(photos)], (640, 480))[:, :, ::-1].copy()
            cv2.rectangle(frame, ((7 * i) % 560, 100), ((7 * i) % 560 + 80, 220), (0, 200, 255), -1)
            writer.write(frame)
        writer.release()
        stats_path = Path(d) / "stats.json"
        proc = subprocess.Popen([sys.executable, "-m", "edgekit_runtime.cli", "stream", str(built["bundle"]),
                                 "--keyring", str(pub), "--source", str(clip), "--threads", "1", "--jsonl",
                                 str(Path(d) / "results.jsonl"), "--stats-json", str(stats_path),
                                 "--stats-every", "10"], cwd=common.REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        t0, rss = time.monotonic(), []
        while proc.poll() is None:
            try:
                kb = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                          if line.startswith("VmRSS:"))
                rss.append((time.monotonic() - t0, kb / 1024))
            except (OSError, StopIteration):
                pass
            time.sleep(1.0)
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise RuntimeError(f"stream failed: {err[-2000:]}")
        stats = json.loads(stats_path.read_text())
    return {"model": STREAM_MODEL, "precision": "fp32", "video": {"fps": 30, "size": [640, 480], "seconds": seconds},
            "stats": stats, "rss_mib_samples": rss, **rss_trend(rss)}


def rss_trend(rss: list[tuple[float, float]]) -> dict[str, float | None]:
    """Resident memory while streaming: after 10 s (the model loaded, the first frames through), its maximum, and
    the slope of a line fitted from 10 s on — leaving out the last two samples, taken while the process exits."""
    steady = [(t, m) for t, m in rss[:-2] if t >= 10]
    slope = float(np.polyfit([t for t, _ in steady], [m for _, m in steady], 1)[0]) * 60 if len(steady) > 2 else None
    return {"rss_mib_after_10s": steady[0][1] if steady else None,
            "rss_mib_max": max(m for _, m in steady) if steady else None, "rss_slope_mib_per_min": slope}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown_only:
        doc = json.loads((args.out / "serve.json").read_text())
        return common.write_results(args.out, "serve", None, markdown)
    from edgekit_runtime.bench import system_description

    common.ensure_importable()
    if args.only_stream:
        doc = json.loads((args.out / "serve.json").read_text())
        doc["stream"] = stream_run(args.threads, args.rebuild, args.stream_seconds)
        return common.write_results(args.out, "serve", doc, markdown)
    built = build_bundle(args.threads, args.rebuild)
    bundle, pub = built["bundle"], common.ensure_keys()["public"]
    if args.only_engine:
        doc = json.loads((args.out / "serve.json").read_text())
        doc["engine_scaling"] = engine_scaling(bundle, pub, args.threads, args.max_batch)
        doc["engine_scaling_system"] = system_description()
        return common.write_results(args.out, "serve", doc, markdown)
    x = np.random.default_rng(0).normal(size=(1, 3, common.SIZE, common.SIZE)).astype(np.float32)
    body, headers = tensor_body(x)
    doc: dict[str, Any] = {**common.run_header("serve/1", argv), "model": MODEL, "target": TARGET,
                           "precision": built["report"].get("precision"), "settings": vars(args) | {"out": None},
                           "system": system_description(), "provenance": common.provenance(), "runs": {}}
    configs = {"max_batch_1": ["--max-batch", "1"],
               f"max_batch_{args.max_batch}": ["--max-batch", str(args.max_batch), "--max-delay-ms",
                                               str(args.max_delay_ms)]}
    for name, extra in configs.items():
        server = ServerProcess(bundle, pub, "--threads", str(args.threads), *extra)
        try:
            log(f"{name}: {args.clients} clients for {args.seconds:.0f}s")
            doc["runs"][name] = {"server_args": extra, **load_test(server, body, headers, args.clients, args.seconds)}
            r = doc["runs"][name]
            log(f"  {r['throughput_rps']:.1f} req/s, p50 {r['latency_ms']['p50']:.1f} ms, p99 "
                f"{r['latency_ms']['p99']:.1f} ms, mean batch {r['server']['mean_batch']}")
            if name == "max_batch_1":
                log("one-client overhead (endpoint vs in-process)")
                doc["overhead"] = overhead(server, bundle, pub, args.threads, args.overhead_queries)
        finally:
            server.stop()
    # below saturation, on a fresh server (its /metrics quantiles cover the last minutes: no closed-loop figures)
    rate = args.open_loop_share * doc["runs"]["max_batch_1"]["throughput_rps"]
    log(f"open loop: Poisson arrivals at {rate:.0f} req/s ({args.open_loop_share:.0%} of max-batch 1's closed-loop "
        "throughput)")
    server = ServerProcess(bundle, pub, "--threads", str(args.threads), *configs[f"max_batch_{args.max_batch}"])
    try:
        doc["open_loop"] = open_loop(server, body, headers, rate, args.seconds)
    finally:
        server.stop()
    ol = doc["open_loop"]
    log(f"  p50 {ol['latency_ms']['p50']:.1f} ms, p99 {ol['latency_ms']['p99']:.1f} ms, mean batch "
        f"{ol['server']['mean_batch']}")
    log("the engine alone: batch 1 against batch B, in this process")
    doc["engine_ceiling"] = engine_ceiling(bundle, pub, args.threads, args.max_batch)
    one, many = doc["runs"]["max_batch_1"], doc["runs"][f"max_batch_{args.max_batch}"]
    doc["speedup"] = many["throughput_rps"] / one["throughput_rps"]
    inf = many["server"]["inference_per_batch_ms"]
    doc["p99_bound_ms"] = args.max_delay_ms + inf["p99"]
    log(f"batching: {doc['speedup']:.2f}x throughput (the engine alone: {doc['engine_ceiling']['ratio']:.2f}x); p99 {many['latency_ms']['p99']:.1f} ms vs delay + batch "
        f"p99 {doc['p99_bound_ms']:.1f} ms; one client adds {doc['overhead']['image_added_p50_ms']:.2f} ms (image), "
        f"{doc['overhead']['tensor_added_p50_ms']:.2f} ms (tensor)")
    if args.stream_seconds > 0:
        log(f"stream: {args.stream_seconds:.0f} s of 30 fps video through {STREAM_MODEL} FP32, one thread")
        doc["stream"] = stream_run(args.threads, args.rebuild, args.stream_seconds)
    return common.write_results(args.out, "serve", doc, markdown)


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    sysinfo = doc["system"]
    lines = [
        "# Serving: dynamic batching and endpoint overhead", "",
        f"{doc.get('generated_at', '')} · `{doc.get('command', '')}` · {sysinfo.get('cpu', '')} "
        f"({', '.join(sysinfo.get('cpu_flags', [])) or 'no AVX-512/VNNI'}), {sysinfo.get('usable_cores', '?')} cores · "
        f"{s['threads']} inference thread(s) · {doc['model']} {doc['precision']} on {doc['target']} (ONNX Runtime)", "",
        f"## {s['clients']} closed-loop clients, binary FP32 tensors, {s['seconds']:.0f} s per configuration", "",
        "| server | req/s | p50 ms | p99 ms | mean batch | inference per batch p50 / p99 ms | queue p50 / p99 ms | errors |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for name, r in doc["runs"].items():
        sv = r["server"]
        lines.append(f"| `{' '.join(r['server_args'])}` | {r['throughput_rps']:.1f} | {r['latency_ms']['p50']:.1f} | "
                     f"{r['latency_ms']['p99']:.1f} | {sv['mean_batch']:.2f} | "
                     f"{sv['inference_per_batch_ms']['p50']:.1f} / {sv['inference_per_batch_ms']['p99']:.1f} | "
                     f"{sv['queue_ms']['p50']:.1f} / {sv['queue_ms']['p99']:.1f} | {r['errors']} |")
    many = doc["runs"][f"max_batch_{s['max_batch']}"]
    ceil, mb = doc["engine_ceiling"], s["max_batch"]
    lines += ["", f"Dynamic batching: **{doc['speedup']:.2f}×** the throughput of `--max-batch 1`. The engine alone, "
              f"in one process without HTTP, runs {ceil[f'rows_per_s_batch_{mb}']:.0f} rows/s in "
              f"batches of {mb} against {ceil['rows_per_s_batch_1']:.0f} at batch 1 "
              f"(**{ceil['ratio']:.2f}×**): the most batching can give for this model on this CPU. "
              f"p99 with batching {many['latency_ms']['p99']:.1f} ms against the configured delay plus one batch's "
              f"p99 inference ({s['max_delay_ms']:g} + {many['server']['inference_per_batch_ms']['p99']:.1f} = "
              f"{doc['p99_bound_ms']:.1f} ms).", ""]
    if doc.get("engine_scaling"):
        sizes = sorted(int(k.rsplit("_", 1)[1]) for k in doc["engine_scaling"][0] if k.startswith("rows_per_s_batch_"))
        lines += ["## The engine alone: rows/s by batch size (`--only-engine`)", "",
                  "One process, no HTTP; every batch size runs the same rows per round, the order rotating. What "
                  "batching can gain is the gain here: with one thread a row costs the same alone or in a batch.", "",
                  "| threads | spin-wait | " + " | ".join(f"batch {n}" for n in sizes) + f" | batch {mb} ÷ batch 1 |",
                  "|---:|---|" + "---:|" * (len(sizes) + 1)]
        for e in doc["engine_scaling"]:
            lines.append(f"| {e['threads']} | {'on' if e['spin_wait'] else 'off'} | "
                         + " | ".join(f"{e[f'rows_per_s_batch_{n}']:.0f}" for n in sizes) + f" | {e['ratio']:.2f}× |")
        lines.append("")
    if doc.get("open_loop"):
        ol = doc["open_loop"]
        sv = ol["server"]
        bound = s["max_delay_ms"] + sv["inference_per_batch_ms"]["p99"]
        lines += [f"## Open loop (below saturation), `--max-batch {mb}`: Poisson arrivals at {ol['rate_rps']:.0f} req/s", "",
                  "Latency from each request's scheduled time. Under the closed loop above the engine never idles, "
                  "so a request also waits for the batch in progress; below saturation it should not.", "",
                  "| req/s | client p50 ms | client p99 ms | server p50 / p99 ms (read to reply) | mean batch | "
                  "inference per batch p99 ms | delay + batch p99 | errors |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|",
                  f"| {ol['requests'] / s['seconds']:.1f} | {ol['latency_ms']['p50']:.1f} | {ol['latency_ms']['p99']:.1f} | "
                  f"{sv.get('server_total_ms', {}).get('p50', float('nan')):.1f} / "
                  f"{sv.get('server_total_ms', {}).get('p99', float('nan')):.1f} | "
                  f"{sv['mean_batch']:.2f} | {sv['inference_per_batch_ms']['p99']:.1f} | {bound:.1f} | {ol['errors']} |", ""]
    o = doc["overhead"]
    lines += ["## One client: the endpoint against the in-process API (alternating blocks, p50 ms)", "",
              "| input | HTTP endpoint | in-process | added by the endpoint |", "|---|---:|---:|---:|",
              f"| JPEG {o['jpeg_bytes']} bytes ({o['image'][1]}×{o['image'][0]}) → top-k | "
              f"{o['http_image']['p50']:.2f} | {o['predict_image']['p50']:.2f} (`Model.predict`) | "
              f"{o['image_added_p50_ms']:.2f} |",
              f"| FP32 tensor, binary | {o['http_tensor']['p50']:.2f} | {o['run_tensor']['p50']:.2f} (`Model.run`) | "
              f"{o['tensor_added_p50_ms']:.2f} |", "",
              "Clients and server share the machine's cores (loopback); the server is a separate process.", ""]
    if doc.get("stream"):
        st = doc["stream"]
        ss = st["stats"]
        inf = ss["stages"]["inference"]
        lines += ["## `edgekit-runtime stream`: a 30 fps file through a model slower than a frame", "",
                  f"{st['video']['seconds']:.0f} s of {st['video']['size'][0]}×{st['video']['size'][1]} MJPG at 30 fps, "
                  f"paced at its own rate as a camera delivers it; {st['model']} {st['precision']} on one thread "
                  f"(inference p50 {inf['p50_ms']:.1f} ms, p99 {inf['p99_ms']:.1f} ms).", "",
                  "| captured | processed | dropped | drop rate | processed fps | frames held at most | "
                  "RSS after 10 s | RSS max | RSS slope after 10 s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {ss['captured']} | {ss['processed']} | {ss['dropped']} | {ss['drop_rate']:.1%} | "
                  f"{ss['processed_fps']:.1f} | {ss['frames_held_max']} | {st['rss_mib_after_10s']:.1f} MiB | "
                  f"{st['rss_mib_max']:.1f} MiB | {st['rss_slope_mib_per_min']:+.2f} MiB/min |", "",
                  "p50 per stage (ms): " + ", ".join(f"{k} {v['p50_ms']:.2f}" for k, v in ss["stages"].items()
                                                    if v.get("count")), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
