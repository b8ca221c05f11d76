"""``edgekit-runtime``: the device-side command line (argparse, no extra deps).

    edgekit-runtime verify BUNDLE [--keyring DIR]
    edgekit-runtime run BUNDLE IMAGE... [--top-k N] [--json] [--save-masks DIR]
    edgekit-runtime bench BUNDLE [--queries N] [--seconds T] [--batch B] [--json-out F] [--no-memory]
                         [--profile [--profile-queries N] [--profile-top K]]
    edgekit-runtime serve BUNDLE_OR_STATE_DIR... [--port P] [--max-batch B] [--max-delay-ms D] [--token-file F]
                         [--tls-cert C --tls-key K]
    edgekit-runtime stream BUNDLE --source 0|video.mp4|rtsp://... [--jsonl F] [--mqtt URL --topic T]
                         [--video-out F] [--max-frames N] [--duration S] [--pace auto|none]

Exit codes: 0 ok, 2 usage, 3 a runtime error (its stable code is printed).
With ``--json`` stdout holds exactly one JSON document, errors included:
``{"ok": false, "error": {"code", "name", "message", "hint"}}`` where ``code`` is the
stable runtime error code (:class:`~.contract.errors.ErrorCode`; a wrong command line
is ``CONFIG_INVALID``), as in telemetry events and ``edgekit-agent``'s answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__, jetson
from .api import load
from .bench import BenchSettings, run_benchmark
from .bundle import open_bundle
from .contract.errors import ErrorCode, ExitStatus, RuntimeConfigError, RuntimeErrorBase
from .keyring import Keyring
from .memory import measure as measure_memory
from .processing import IMAGE_SUFFIXES, list_images
from .profiling import ProfileSettings, profile_model, profiling_unavailable_reason


def _keyring(args: argparse.Namespace) -> Keyring | None:
    return Keyring.from_paths(*args.keyring) if args.keyring else None


def _expand(inputs: list[str]) -> list[Path]:
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        out.extend(list_images(p) if p.is_dir() else [p])
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    b = open_bundle(args.bundle, _keyring(args))
    info = {"ok": True, "bundle": str(args.bundle), "key_id": b.key_id, "model": b.manifest.model.to_dict(),
            "target": b.manifest.target.name, "format_version": b.manifest.format_version,
            "files": len(b.members)}
    print(json.dumps(info, indent=2) if args.json else f"OK {args.bundle}: {info['model']['name']} "
          f"{info['model']['version']} for {info['target']} (key {b.key_id}, {info['files']} files verified)")
    return ExitStatus.OK


def _tensor_rows(model, paths: list[Path]) -> list[dict]:
    """``.npz`` inputs: one array per input name (several samples along the first axis) → every output."""
    import numpy as np

    from .contract.errors import InputError

    rows = []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as data:
                feeds = {name: data[name] for name in data.files}
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is not a .npz of arrays readable without pickle ({exc})",
                             code=ErrorCode.INPUT_UNREADABLE,
                             hint="save it with numpy.savez(path, input_name=array, ...)") from None
        outputs = model.run(feeds)
        rows.append({"input": str(path), "outputs": {k: np.asarray(v).tolist() for k, v in outputs.items()}})
    return rows


def cmd_run(args: argparse.Namespace) -> int:
    tensors = [Path(i) for i in args.inputs if i.endswith(".npz")]
    if tensors:  # a model's own tensors by input name (any model; the one way into a model with several inputs)
        if len(tensors) != len(args.inputs):
            raise RuntimeConfigError("give either images or .npz tensor files, not both",
                                     hint="run the two kinds in separate calls")
        with load(args.bundle, keyring=_keyring(args), threads=args.threads, engine=args.engine) as model:
            rows = _tensor_rows(model, tensors)
        if args.json:
            print(json.dumps(rows))
        else:
            for row in rows:
                shown = (f"{k} {_shape(v)} {str(v)[:60]}" for k, v in row["outputs"].items())
                print(f"{row['input']}: " + "; ".join(shown))
        return ExitStatus.OK
    images = _expand(args.inputs)
    with load(args.bundle, keyring=_keyring(args), threads=args.threads, engine=args.engine) as model:
        kind = model.manifest.postprocess.type if model.manifest.postprocess is not None else None
        if args.save_masks is not None and kind != "segmentation":
            raise RuntimeConfigError(f"--save-masks needs a segmentation bundle; this one's postprocess is {kind!r}",
                                     hint="leave --save-masks out")
        results = model.predict(images, top_k=args.top_k or None)
    rows = [{"input": str(p), **r} for p, r in zip(images, results)]
    if kind == "segmentation":
        _mask_rows(rows, args.save_masks)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['input']}: {_row_text(row)}")
    return ExitStatus.OK


def _mask_rows(rows: list[dict], folder: Path | None) -> None:
    """Segmentation rows: the mask array leaves the row; with ``folder`` it is written there as a PNG
    (pixel value = channel index, 0 background), named after the image, and the row says where."""
    import numpy as np

    from .processing import cv2_module

    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for row in rows:
        mask = row.pop("mask")
        if folder is None:
            continue
        stem = Path(row["input"]).stem
        name, n = f"{stem}.png", 1
        while name in used:  # two images of one name in different folders
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name)
        target = folder / name
        if not cv2_module().imwrite(str(target), np.ascontiguousarray(mask, dtype=np.uint8)):
            raise RuntimeConfigError(f"could not write the mask {target}", hint="check that the folder is writable")
        row["mask_file"] = str(target)


def _row_text(row: dict) -> str:
    """One result as a line of text: top-k labels, detections, or a mask's classes."""
    if "top_k" in row:
        return ", ".join(f"{t['label']} {t['score']:.3f}" for t in row["top_k"])
    if "detections" in row:
        found = row["detections"]
        shown = ", ".join(f"{d['label']} {d['score']:.2f} [{', '.join(f'{v:.0f}' for v in d['box'])}]"
                          for d in found[:10])
        more = f", ... ({len(found) - 10} more)" if len(found) > 10 else ""
        return f"{len(found)} detection(s)" + (f": {shown}{more}" if found else "")
    if "classes" in row:
        w, h = row["image_size"]
        text = ", ".join(f"{label} {count / (w * h):.1%}" for label, count in row["classes"].items())
        return text + (f" (mask {row['mask_file']})" if "mask_file" in row else "")
    return str(row["output"])[:80]


def _shape(value: list) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape


def cmd_bench(args: argparse.Namespace) -> int:
    settings = BenchSettings(min_queries=args.queries, min_duration_s=args.seconds,
                             offline_batch=args.batch or None, seed=args.seed, warmup=args.warmup)
    images = _expand(args.inputs) if args.inputs else None
    if args.power_mode is not None or args.lock_clocks:
        if not jetson.is_jetson():
            return _usage_error(args, "--power-mode/--lock-clocks need a Jetson (nvpmodel, jetson_clocks)")
        if args.power_mode is not None:
            jetson.set_power_mode(args.power_mode)
        if args.lock_clocks:
            jetson.lock_clocks()
    ring = _keyring(args)
    try:
        with load(args.bundle, keyring=ring, threads=args.threads, engine=args.engine) as model:
            # Refuse --profile before the benchmark runs, not after it.
            reason = profiling_unavailable_reason(model) if args.profile else None
            if reason:
                raise RuntimeConfigError(f"--profile is not available for this bundle: {reason}",
                                         code=ErrorCode.CONFIG_INVALID, hint="benchmark without --profile")
            result = run_benchmark(model, images, settings)
            if args.profile:  # a separate profiling session, after the timed run
                result["profile"] = profile_model(model, images, ProfileSettings(
                    queries=args.profile_queries, warmup=min(args.warmup, 10), top=args.profile_top, seed=args.seed))
    finally:
        if args.lock_clocks:
            jetson.restore_clocks()
    if not args.no_memory:
        # After the model above is closed: on a device short of memory the probe must not hold a second copy.
        result["memory"] = measure_memory(args.bundle, ring, threads=args.threads, engine=args.engine,
                                          warmup=args.warmup, offline_batch=settings.offline_batch,
                                          images=images, seed=args.seed)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return ExitStatus.OK
    ss = result["single_stream"]["inference"]
    print(f"p50 {ss['p50_ms']:.3f} ms  p90 {ss['p90_ms']:.3f} ms  p99 {ss['p99_ms']:.3f} ms  "
          f"QPS {result['single_stream']['qps']:.1f}  ({ss['count']} queries)")
    mem = result.get("memory")
    if mem:
        print(f"memory (RSS): baseline {mem['baseline_mib']:.1f} MiB, after load {mem['after_load_mib']:.1f} MiB, "
              f"peak {mem['peak_mib']:.1f} MiB")
    if "profile" in result:
        for line in profile_lines(result["profile"]):
            print(line)
    return ExitStatus.OK


def _capture_settings(args: argparse.Namespace):
    from .capture import settings_from_args

    return settings_from_args(args.capture_dir, args.capture_rate, args.capture_low_confidence,
                              args.capture_per_minute, args.capture_max_files, args.capture_max_mb,
                              args.capture_drift_z)


def _capture_flags(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("sample capture (off unless --capture-dir is given)")
    g.add_argument("--capture-dir", type=Path, metavar="DIR",
                   help="keep sampled inputs with the model's results here, for retraining "
                        "(`edgekit fleet samples pull` fetches them)")
    g.add_argument("--capture-rate", type=float, default=0.01, help="share of ordinary inputs kept at random")
    g.add_argument("--capture-low-confidence", type=float, default=0.5,
                   help="keep inputs whose top-1 (or best detection) score is below this")
    g.add_argument("--capture-drift-z", type=float, default=3.0,
                   help="keep inputs whose mean lies this many standard deviations from the calibration samples' "
                        "(the bundle's input_stats)")
    g.add_argument("--capture-per-minute", type=float, default=30.0, help="at most this many samples a minute")
    g.add_argument("--capture-max-files", type=int, default=5000, help="samples kept on disk at most")
    g.add_argument("--capture-max-mb", type=float, default=512.0, help="disk the samples may use at most")


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeSettings, serve

    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise RuntimeConfigError(f"cannot read the token file {args.token_file} ({exc})") from None
        if not token:
            raise RuntimeConfigError(f"the token file {args.token_file} is empty")
    settings = ServeSettings(host=args.host, port=args.port, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                             batch_delay=args.batch_delay,
                             max_queue=args.max_queue, timeout_ms=args.timeout_ms, max_body_mb=args.max_body_mb,
                             token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                             check_every_s=args.check_every_s, capture=_capture_settings(args),
                             shadow_report=args.shadow_report, report_dir=args.report_dir)
    return serve(args.sources, settings, keyring=_keyring(args), threads=args.threads, engine=args.engine,
                 shadow=args.shadow)


def cmd_stream(args: argparse.Namespace) -> int:
    import signal
    import threading

    from . import stream as st

    settings = st.StreamSettings(source=args.source, pace=args.pace, max_frames=args.max_frames,
                                 duration_s=args.duration, stats_every_s=args.stats_every, top_k=args.top_k)
    stop = threading.Event()
    closers = []
    with load(args.bundle, keyring=_keyring(args), threads=args.threads, engine=args.engine) as model:
        pre = model.manifest.preprocess
        if pre is None or pre.type != "image":
            raise RuntimeConfigError("stream needs a bundle that takes images (image pre-processing)",
                                     hint="use `edgekit-runtime run` with .npz tensors for this bundle")
        sinks, reporters = [], [st.print_stats]
        out = None
        if args.jsonl is not None:
            out = sys.stdout if str(args.jsonl) == "-" else open(args.jsonl, "w")  # noqa: SIM115 - closed below
            sinks.append(st.jsonl_sink(out))
        if args.mqtt:
            if not args.topic:
                raise RuntimeConfigError("--mqtt needs --topic")
            from .agent.stream_mqtt import stream_publisher

            result, stats, close = stream_publisher(args.mqtt, args.topic)
            sinks.append(result)
            reporters.append(stats)
            closers.append(close)
        if args.video_out is not None:
            size, fps = _video_geometry(args.source)
            write, release = st.video_sink(args.video_out, args.video_fps or fps or 30.0, size)
            sinks.append(write)
            closers.append(release)
        if args.report_dir is not None:
            from .fileio import atomic_write

            args.report_dir.mkdir(parents=True, exist_ok=True)
            reporters.append(lambda doc: atomic_write(args.report_dir / "stream.json",
                                                      json.dumps({**doc, "source": st.redact(args.source)}).encode(),
                                                      durable=False))
        if args.stats_json is not None:
            reporters.append(lambda doc: doc["final"] and Path(args.stats_json).write_text(json.dumps(doc, indent=2)))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        try:
            capture = _capture_settings(args)
            if capture is not None:
                from .capture import SampleCapture

                sampler = SampleCapture(capture)
                info = {"name": model.manifest.model.name, "version": model.manifest.model.version,
                        "release": model.manifest.model.release}
                shown = st.redact(args.source)  # an rtsp:// password never goes into a sample's sidecar
                sinks.append(lambda result, frame: sampler.offer(frame, result, info, source=shown, bgr=True,
                                                                 drift_z=result.get("input_z")))
            st.run_stream(model, settings, sinks, on_stats=lambda doc: [r(doc) for r in reporters], stop=stop)
        finally:
            for close in closers:
                close()
            if out is not None and out is not sys.stdout:
                out.close()
    return ExitStatus.OK


def _video_geometry(source: str) -> tuple[tuple[int, int], float | None]:
    """(width, height) of the source's frames and its frame rate, read from one frame."""
    from . import stream as st

    cap, _ = st.open_source(source)
    try:
        cv2 = st.cv2_module()
        ok, frame = cap.read()
        if not ok:
            raise RuntimeConfigError(f"no frame could be read from {source!r}")
        fps = cap.get(cv2.CAP_PROP_FPS)
        return (frame.shape[1], frame.shape[0]), (float(fps) if fps and fps > 0 else None)
    finally:
        cap.release()


def profile_lines(profile: dict) -> list[str]:
    """A profile (:func:`~.profiling.profile_model`) as plain-text lines: a header, then one line per layer."""
    lines = [f"per-layer ({profile['engine']}, {profile['queries']} profiled queries, layers cover "
             f"{profile['coverage']:.0%} of a query's {profile['latency_ms']['mean']:.3f} ms):"]
    for row in profile["layers"]:
        lines.append(f"  {row['share']:6.1%}  {row['mean_us']:9.1f} us  {row['op_type']:<24} "
                     f"{row['precision'] or '?':<5} {row['kernel'] or '':<24} {row['name']}")
    return lines


def _print_error(error: dict) -> None:
    print(json.dumps({"ok": False, "error": error}, indent=2))


def _usage_error(args: argparse.Namespace, message: str) -> int:
    """A wrong command line found after parsing: say so (as JSON with --json) and exit 2."""
    if getattr(args, "json", False):
        _print_error({"code": int(ErrorCode.CONFIG_INVALID), "name": ErrorCode.CONFIG_INVALID.name,
                      "message": message, "hint": "see --help"})
    print(f"error: {message}", file=sys.stderr)
    return ExitStatus.USAGE


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are a JSON document too when ``--json`` is on the command line."""

    json_errors = False  # set by main() for the command line it parses

    def error(self, message: str):  # type: ignore[override]
        if _Parser.json_errors:
            _print_error({"code": int(ErrorCode.CONFIG_INVALID), "name": ErrorCode.CONFIG_INVALID.name,
                          "message": f"{self.prog}: {message}", "hint": "see --help"})
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgekit-runtime", description="Run edgekit bundles on a device.")
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("bundle", type=Path)
        sp.add_argument("--keyring", action="append", help="trusted public key file or directory (repeatable)")
        sp.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser("verify", help="check signature and integrity")
    common(v)
    v.set_defaults(func=cmd_verify)
    for name, fn, help_ in (("run", cmd_run, "predict on images"), ("bench", cmd_bench, "benchmark latency")):
        sp = sub.add_parser(name, help=help_)
        common(sp)
        sp.add_argument("inputs", nargs="*" if name == "bench" else "+",
                        help=f"image files or folders ({', '.join(sorted(IMAGE_SUFFIXES))})"
                        + ("; or .npz files of tensors, one array per input name" if name == "run" else ""))
        sp.add_argument("--threads", type=int)
        sp.add_argument("--engine", help="force an engine instead of the manifest's order")
        sp.set_defaults(func=fn)
    r = sub.choices["run"]
    r.add_argument("--top-k", type=int)
    r.add_argument("--save-masks", type=Path, metavar="DIR",
                   help="segmentation bundles: write each image's mask as a PNG (pixel value = class index) into DIR")
    b = sub.choices["bench"]
    b.add_argument("--queries", type=int, default=200)
    b.add_argument("--seconds", type=float, default=2.0)
    b.add_argument("--batch", type=int, default=8, help="offline batch size (0: skip offline)")
    b.add_argument("--warmup", type=int, default=20)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json-out", type=Path)
    b.add_argument("--power-mode", type=int, help="Jetson: nvpmodel mode to benchmark at (root)")
    b.add_argument("--lock-clocks", action="store_true", help="Jetson: jetson_clocks during the run, restored after")
    b.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory (RSS) probe, a short run of the bundle in a child process")
    b.add_argument("--profile", action="store_true",
                   help="per-layer timings from the engine's profiler (OpenVINO, ONNX Runtime), in a separate pass")
    b.add_argument("--profile-queries", type=int, default=50, help="queries in the profiling pass")
    b.add_argument("--profile-top", type=int, default=15, help="layers listed, slowest first")
    s = sub.add_parser("serve", help="serve bundles over HTTP (KServe v2), with dynamic batching",
                       description="Serve bundles, or the active slot of an agent's state directory (followed "
                                   "across installs and rollbacks), over HTTP with the KServe v2 protocol.")
    s.add_argument("sources", nargs="+", help="bundle (.ekb) or agent state directory; NAME=PATH names the route")
    s.add_argument("--keyring", action="append", help="trusted public key file or directory (repeatable)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="0: any free port (printed on the first line)")
    s.add_argument("--max-batch", type=int, default=8, help="rows joined into one batch (1: no batching)")
    s.add_argument("--max-delay-ms", type=float, default=2.0,
                   help="longest a request waits for others to join its batch")
    s.add_argument("--batch-delay", choices=["arriving", "fixed"], default="arriving",
                   help="arriving: wait only for requests already being received (a lone client never waits); "
                        "fixed: always wait up to --max-delay-ms")
    s.add_argument("--max-queue", type=int, default=64, help="queued requests per model before HTTP 429")
    s.add_argument("--timeout-ms", type=float, default=10_000.0,
                   help="a request's deadline in the queue, unless it gives parameters.timeout (µs)")
    s.add_argument("--max-body-mb", type=float, default=32.0, help="larger request bodies get HTTP 413")
    s.add_argument("--token-file", type=Path, help="file holding the bearer token every request but the "
                                                   "health probes must send")
    s.add_argument("--tls-cert", type=Path, help="PEM certificate chain (HTTPS)")
    s.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    s.add_argument("--check-every-s", type=float, default=0.5,
                   help="how often a state directory's active slot is checked for a switch")
    s.add_argument("--shadow", metavar="[NAME=]BUNDLE",
                   help="run this candidate bundle beside the served model on the same inputs, never serving its "
                        "results; agreement and latency at /v2/models/NAME/shadow and in /metrics")
    s.add_argument("--shadow-report", type=Path, metavar="FILE",
                   help="write the shadow report (JSON) here every 10 s, for the agent's telemetry")
    s.add_argument("--report-dir", type=Path, metavar="DIR",
                   help="write serve-ROUTE.json (requests, stages, batches, shadow) here every 10 s: the agent's "
                        "reports_dir, whose fresh reports ride in its MQTT telemetry")
    s.add_argument("--threads", type=int)
    s.add_argument("--engine", help="force an engine instead of the manifest's order")
    s.add_argument("--json", action="store_true", help="errors as one JSON document")
    _capture_flags(s)
    s.set_defaults(func=cmd_serve)
    t = sub.add_parser("stream", help="run a camera, video file or RTSP stream through a bundle",
                       description="Frames from a camera, file or stream through an image bundle; frames are "
                                   "dropped, never queued, when inference falls behind.")
    common(t)
    t.add_argument("--source", required=True, help="camera index (0), video file, or rtsp:// / http:// URL")
    t.add_argument("--jsonl", type=Path, metavar="FILE", help="one JSON result per processed frame ('-': stdout)")
    t.add_argument("--mqtt", metavar="URL", help="publish results to this broker (mqtt://host:port); needs --topic")
    t.add_argument("--topic", help="MQTT topic for results (statistics go to TOPIC/stats)")
    t.add_argument("--video-out", type=Path, metavar="FILE", help="annotated video of the processed frames "
                                                                  "(.avi MJPG or .mp4 mp4v)")
    t.add_argument("--video-fps", type=float, help="frame rate of --video-out (default: the source's)")
    t.add_argument("--pace", choices=["auto", "none"], default="auto",
                   help="auto: a file plays at its own frame rate, like a camera (frames drop when inference "
                        "is slower); none: every frame of a file, no drops")
    t.add_argument("--max-frames", type=int, help="stop after this many captured frames")
    t.add_argument("--duration", type=float, help="stop after this many seconds")
    t.add_argument("--stats-every", type=float, default=5.0, help="seconds between statistics lines")
    t.add_argument("--stats-json", type=Path, help="write the final statistics here")
    t.add_argument("--report-dir", type=Path, metavar="DIR",
                   help="write stream.json (the statistics) here at every report: the agent's reports_dir, whose "
                        "fresh reports ride in its MQTT telemetry")
    t.add_argument("--top-k", type=int)
    t.add_argument("--threads", type=int)
    t.add_argument("--engine", help="force an engine instead of the manifest's order")
    _capture_flags(t)
    t.set_defaults(func=cmd_stream)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _Parser.json_errors = "--json" in argv
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RuntimeErrorBase as exc:
        if args.json:  # one document on stdout either way
            _print_error(exc.to_event())
        print(f"error: {exc}", file=sys.stderr)
        return ExitStatus.RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())
