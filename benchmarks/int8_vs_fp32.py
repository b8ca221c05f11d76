"""FP32 vs INT8 latency of edgekit bundles, interleaved in one process.

For each model (torchvision, random weights, BatchNorm statistics re-estimated on
real photos — see benchmarks/common.py) and each x86 target, the project's
pipeline compiles two signed bundles: INT8 (the profile's quantization defaults,
calibrated on 300 crops of sklearn's sample photos) and FP32
(``quantize.enabled: false``). Both are loaded with ``edgekit_runtime.load`` and
measured with ``edgekit_runtime.bench.compare`` — single-stream queries
alternating FP32/INT8 (and which goes first), so load or clock drift hits both —
followed by an offline (batch 8) throughput run of each. Random weights have no
accuracy, so the quality figure is the agreement of FP32 and INT8 top-1 on
held-out crops.

Run from anywhere (the repository root is put on sys.path)::

    .venv/bin/python benchmarks/int8_vs_fp32.py --models resnet18,resnet50,mobilenet_v2

Writes ``--out``/int8_vs_fp32.json (everything, with each run's system
description) and ``--out``/int8_vs_fp32.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(common.MODELS), help="comma-separated torchvision names")
    p.add_argument("--targets", default=",".join(common.TARGETS), help="comma-separated target profiles")
    p.add_argument("--queries", type=int, default=200, help="single-stream queries per model (at least)")
    p.add_argument("--seconds", type=float, default=2.0, help="single-stream duration (at least)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="single-stream duration cap")
    p.add_argument("--warmup", type=int, default=20, help="warm-up queries per model")
    p.add_argument("--offline-batch", type=int, default=8, help="offline batch size (0: skip)")
    p.add_argument("--threads", type=int, default=common.usable_cores(), help="inference threads (default: all cores)")
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    p.add_argument("--rebuild", action="store_true", help="compile even when a matching cached bundle exists")
    p.add_argument("--markdown-only", action="store_true",
                   help="only re-render --out/int8_vs_fp32.md from the existing JSON")
    p.add_argument("--no-controls", dest="controls", action="store_false",
                   help="skip the control runs (block-interleaved; ONNX Runtime with intra-op spinning off)")
    return p.parse_args(argv)


def agreement(fp32, int8, x: np.ndarray) -> dict:
    """FP32 vs INT8 outputs on the same images (batch 1, through Model.run)."""
    name = fp32.outputs[0].name
    a = np.concatenate([fp32.run(x[i : i + 1])[name] for i in range(len(x))]).astype(np.float64)
    b = np.concatenate([int8.run(x[i : i + 1])[name] for i in range(len(x))]).astype(np.float64)
    t1a, t1b = a.argmax(1), b.argmax(1)
    t5a, t5b = np.argsort(-a, 1)[:, :5], np.argsort(-b, 1)[:, :5]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {
        "images": int(len(x)),
        "top1_agreement_pct": float((t1a == t1b).mean() * 100),
        "top5_overlap_pct": float(np.mean([len(set(p) & set(q)) / 5 for p, q in zip(t5a, t5b)]) * 100),
        "fp32_top1_in_int8_top5_pct": float(np.mean([p in q for p, q in zip(t1a, t5b)]) * 100),
        "logits_cosine_mean": float(cos.mean()),
        "logits_rel_l2_mean": float((np.linalg.norm(a - b, axis=1) / (np.linalg.norm(a, axis=1) + 1e-12)).mean()),
        "logits_max_abs_diff": float(np.abs(a - b).max()),
        "fp32_distinct_top1": int(len(np.unique(t1a))),
        "int8_distinct_top1": int(len(np.unique(t1b))),
    }


def block_interleaved(models: dict, feeds: list[dict], queries: int, warmup: int, block: int = 10,
                      seed: int = 0) -> dict:
    """Control: interleave in blocks (ABBA...) of ``block`` + 1 queries, not counting the first query
    after each switch, so whatever one model leaves behind (spinning threads, cache state) does not
    land in the other's counted queries. Same inputs for both models in a block."""
    from edgekit_runtime.bench import percentiles

    names = list(models)
    order = np.random.default_rng(seed).permutation(len(feeds))
    for n in names:
        for i in range(warmup):
            models[n].engine.run(feeds[int(order[i % len(feeds)])])
    times: dict[str, list[int]] = {n: [] for n in names}
    b = 0
    t0 = time.perf_counter()
    while min(len(v) for v in times.values()) < queries:
        for n in (names if b % 2 == 0 else names[::-1]):
            for j in range(block + 1):
                x = feeds[int(order[(b * block + j) % len(feeds)])]
                s = time.perf_counter_ns()
                models[n].engine.run(x)
                if j:
                    times[n].append(time.perf_counter_ns() - s)
        b += 1
    res = {n: percentiles(v) for n, v in times.items()}
    return {"block": block, "elapsed_s": time.perf_counter() - t0, "inference": res,
            "p50_speedup_int8_vs_fp32": res["fp32"]["p50_ms"] / res["int8"]["p50_ms"]}


def bundle_info(built: dict) -> dict:
    rep = built["report"]
    return {
        "bundle": str(Path(built["bundle"]).relative_to(common.REPO)),
        "reused_from_cache": built["reused"],
        "built_from_pipeline_sources_sha256": built.get("stamp", {}).get("pipeline_sources_sha256"),
        "bundle_bytes": rep.get("bundle_bytes"),
        "artifact_bytes": rep.get("sizes"),
        "precision": rep.get("precision"),
        "backend_version": rep.get("backend_version"),
        "quantization": rep.get("manifest", {}).get("backend", {}).get("quantization"),
        "engine_options": rep.get("manifest", {}).get("backend", {}).get("options"),
        "export": rep.get("steps", {}).get("export"),
        "compile_seconds": rep.get("seconds"),
        "compile_time_latency_ms": {k: v for k, v in (rep.get("latency_ms") or {}).items() if k != "measured_on"},
    }


def _cell(f: float, q: float, cpu: dict | None = None) -> str:
    return f"{f / q:.2f}× ({f:.2f} / {q:.2f} ms; others {_others(cpu)})"


def _others(d: dict | None) -> str:
    return f"{d['other_processes_pct']:.0f} %" if d and "other_processes_pct" in d else "?"


def mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f}"


def markdown(doc: dict) -> str:
    sysd = doc["system"]
    s = doc["settings"]
    lines = [
        "# INT8 vs FP32 (edgekit bundles, interleaved)",
        "",
        f"- **Machine**: {sysd['cpu']} ({', '.join(sysd['cpu_flags']) or 'no AVX2/AVX512/VNNI flags'}), "
        f"{sysd['usable_cores']} usable cores ({sysd['logical_cores']} logical), {sysd['os']}",
        f"- **Threads**: {s['threads']} inference threads per model; batch 1 single-stream; "
        f"offline batch {s['offline_batch'] or '-'}",
        "- **Precisions**: FP32 = bundle compiled with `quantize.enabled: false` "
        "(OpenVINO: `INFERENCE_PRECISION_HINT=f32`); INT8 = the target profile's post-training "
        "quantization (ONNX Runtime: static Q/DQ, per-channel int8 weights, uint8 activations, minmax; "
        "OpenVINO: NNCF `performance` preset), 300 calibration crops",
        "- **Models**: torchvision, random weights (`weights=None`, seed 0) with BatchNorm statistics "
        "re-estimated on 640 crops of sklearn's sample photos; no accuracy exists, so the quality column "
        "is FP32/INT8 top-1 agreement on "
        f"{doc['results'][0]['agreement']['images'] if doc['results'] else '?'} held-out crops/photos",
        f"- **How**: `edgekit_runtime.bench.compare` in one process: {s['warmup']} warm-up queries each, then "
        f"≥ {s['queries']} queries and ≥ {s['seconds']} s, FP32 and INT8 alternating per query (alternating "
        "which goes first), inference time only (`engine.run`), same input per query pair; offline "
        "throughput measured after, one model at a time. Speed-up = FP32 p50 / INT8 p50.",
        f"- **Versions**: {', '.join(f'{k} {v}' for k, v in doc['versions'].items())}",
        "",
        "| model | target | FP32 p50 / p90 ms | INT8 p50 / p90 ms | speed-up (p50) | offline thr. ratio | "
        "size FP32 → INT8 MB | top-1 agreement | CPU used by other processes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        c = r["compare"]
        f, q = c["models"]["fp32"]["single_stream"]["inference"], c["models"]["int8"]["single_stream"]["inference"]
        ratio = c["ratios"]["int8"]
        off = ratio.get("offline_throughput_ratio_vs_fp32")
        a = r["agreement"]
        lines.append(
            f"| {r['model']} | {r['target']} | {f['p50_ms']:.2f} / {f['p90_ms']:.2f} | "
            f"{q['p50_ms']:.2f} / {q['p90_ms']:.2f} | **{ratio['p50_speedup_vs_fp32']:.2f}×** | "
            f"{f'{off:.2f}×' if off else '-'} | "
            f"{mb(r['bundles']['fp32']['artifact_bytes'].get('fp32'))} → "
            f"{mb(r['bundles']['int8']['artifact_bytes'].get('int8'))} | "
            f"{a['top1_agreement_pct']:.1f} % ({a['images']} imgs, {a['fp32_distinct_top1']} classes) | "
            f"{_others(c.get('cpu_during'))} |"
        )
    lines += ["", "Top-1 agreement: share of held-out images whose FP32 and INT8 top-1 class match "
              "(random weights: the FP32 model spreads these images over only the number of classes shown, "
              "and its logits differ little between images, so small INT8 errors flip top-1 easily; see "
              "the JSON for top-5 overlap and logit cosine). Sizes: the model file(s) inside the bundle.",
              "",
              "CPU used by other processes: share of the machine's CPU time (all cores) spent outside this "
              "process during the single-stream run (/proc/stat minus our own CPU time); the machine was shared.",
              ""]
    if any(r.get("controls") for r in doc["results"]):
        lines += [
            "## Controls (speed-up FP32 p50 / INT8 p50, with the two p50s and the CPU share of other processes)",
            "",
            "| model | target | headline: `bench.compare`, per-query interleaved | block-interleaved "
            "(ABBA blocks of 10, first query after a switch not counted) | per-query interleaved, ORT "
            "`session.intra_op.allow_spinning=0` |",
            "|---|---|---|---|---|",
        ]
        for r in doc["results"]:
            c, ctl = r["compare"]["models"], r.get("controls") or {}
            blk, ns = ctl.get("block_interleaved"), ctl.get("ort_no_spin")
            head = _cell(c["fp32"]["single_stream"]["inference"]["p50_ms"], c["int8"]["single_stream"]["inference"]["p50_ms"],
                         r["compare"].get("cpu_during"))
            bcell = (_cell(blk["inference"]["fp32"]["p50_ms"], blk["inference"]["int8"]["p50_ms"], blk.get("cpu_during"))
                     if blk else "-")
            ncell = (_cell(ns["models"]["fp32"]["single_stream"]["inference"]["p50_ms"],
                           ns["models"]["int8"]["single_stream"]["inference"]["p50_ms"], ns.get("cpu_during")) if ns else "-")
            lines.append(f"| {r['model']} | {r['target']} | {head} | {bcell} | {ncell} |")
        lines += [
            "",
            "ONNX Runtime's intra-op worker threads spin-wait after each run by default (the engine keeps "
            "that default). When two ORT sessions alternate query by query in one process, the idle "
            "session's spinning threads compete with the running session for the cores, which inflates both "
            "latencies and compresses the ratio; the two controls remove that interaction in different ways "
            "(spinning off; or not counting the first query after each switch). A device running one model "
            "does not see this interaction.",
            "",
        ]
    lines += ["Queries per model: " + ", ".join(
        f"{r['model']}/{r['target']} {r['compare']['models']['fp32']['single_stream']['inference']['count']}"
        for r in doc["results"]), ""]
    lines.append(f"Generated {doc['generated_at']} by `{doc['command']}` in {doc['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("edgekit", "edgekit_runtime", "onnxruntime", "openvino", "nncf", "torch", "torchvision", "numpy"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?")).split("-")[0]
        except ImportError:
            pass
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown_only:
        md = markdown(json.loads((args.out / "int8_vs_fp32.json").read_text()))
        (args.out / "int8_vs_fp32.md").write_text(md)
        print(md)
        return 0
    t_start = time.perf_counter()
    from edgekit_runtime.bench import BenchSettings, compare, system_description

    models = [m for m in args.models.split(",") if m]
    targets = [t for t in args.targets.split(",") if t]
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        **common.run_header("int8_vs_fp32", argv),
        "settings": {"models": models, "targets": targets, "queries": args.queries, "seconds": args.seconds,
                     "max_seconds": args.max_seconds, "warmup": args.warmup, "offline_batch": args.offline_batch,
                     "threads": args.threads},
        "system": system_description(),
        "versions": versions(),
        "provenance": common.provenance(),
        "data": {"calibration": "benchmarks/.cache/calib.npz (300 random crops of sklearn sample photos, seed 1)",
                 "eval": "benchmarks/.cache/eval.npz (126 random crops, seed 3, + the 2 full photos)"},
        "results": [],
        "wall_s": 0.0,
    }

    # 1. build (or reuse) every bundle first, so compilation never overlaps a measurement
    built: dict[tuple[str, str, str], dict] = {}
    for m in models:
        for t in targets:
            for prec in ("fp32", "int8"):
                built[(m, t, prec)] = common.build_bundle(m, t, prec, threads=args.threads, rebuild=args.rebuild)
    t_built = time.perf_counter()

    # 2. measure
    ev = common.load_x(common.ensure_data()["eval"])
    samples = [{"input": ev[i : i + 1]} for i in range(len(ev))]
    settings = BenchSettings(warmup=args.warmup, min_queries=args.queries, min_duration_s=args.seconds,
                             max_duration_s=args.max_seconds, offline_batch=args.offline_batch or None, seed=0)
    for m in models:
        for t in targets:
            fp32 = common.load_bundle(built[(m, t, "fp32")]["bundle"], args.threads)
            int8 = common.load_bundle(built[(m, t, "int8")]["bundle"], args.threads)
            name = fp32.inputs[0].name
            feeds = [{name: s["input"]} for s in samples]
            graph = {"fp32": common.inspect_artifact(fp32), "int8": common.inspect_artifact(int8)}
            log(f"{m} {t}: benchmarking FP32 vs INT8 interleaved ({args.threads} threads)")
            t0 = time.perf_counter()
            mon = common.CpuMonitor().start()
            res = compare({"fp32": fp32, "int8": int8}, feeds, settings)
            res["cpu_during"] = mon.stop()
            agree = agreement(fp32, int8, ev)
            f = res["models"]["fp32"]["single_stream"]["inference"]
            q = res["models"]["int8"]["single_stream"]["inference"]
            log(f"{m} {t}: FP32 p50 {f['p50_ms']:.2f} ms, INT8 p50 {q['p50_ms']:.2f} ms -> "
                f"{res['ratios']['int8']['p50_speedup_vs_fp32']:.2f}x; top-1 agreement "
                f"{agree['top1_agreement_pct']:.1f} %; other processes "
                f"{res['cpu_during'].get('other_processes_pct', 0):.0f} % of the CPU ({time.perf_counter() - t0:.0f}s)")
            entry = {
                "model": m, "target": t,
                "checkpoint": built[(m, t, "fp32")]["checkpoint"],
                "bundles": {p: bundle_info(built[(m, t, p)]) for p in ("fp32", "int8")},
                "graph": graph, "compare": res, "agreement": agree, "controls": {},
            }
            doc["results"].append(entry)
            if args.controls:
                # Control 1: block-interleaved, the engines exactly as loaded.
                mon = common.CpuMonitor().start()
                blk = block_interleaved({"fp32": fp32, "int8": int8}, feeds, args.queries, args.warmup)
                blk["cpu_during"] = mon.stop()
                entry["controls"]["block_interleaved"] = blk
                log(f"{m} {t}: control, block-interleaved: FP32 p50 {blk['inference']['fp32']['p50_ms']:.2f} ms, "
                    f"INT8 p50 {blk['inference']['int8']['p50_ms']:.2f} ms -> {blk['p50_speedup_int8_vs_fp32']:.2f}x")
                if fp32.manifest.backend.name == "onnxruntime":
                    # Control 2: per-query interleaved again, ORT intra-op spinning off in both sessions.
                    for mdl in (fp32, int8):
                        mdl.engine.session = common.ort_session_like_engine(mdl, allow_spinning=False)
                    mon = common.CpuMonitor().start()
                    ctl = compare({"fp32": fp32, "int8": int8}, feeds,
                                  BenchSettings(**{**res["settings"], "offline_batch": None}))
                    ctl["cpu_during"] = mon.stop()
                    entry["controls"]["ort_no_spin"] = ctl
                    log(f"{m} {t}: control, ORT spinning off: FP32 p50 "
                        f"{ctl['models']['fp32']['single_stream']['inference']['p50_ms']:.2f} ms, INT8 p50 "
                        f"{ctl['models']['int8']['single_stream']['inference']['p50_ms']:.2f} ms -> "
                        f"{ctl['ratios']['int8']['p50_speedup_vs_fp32']:.2f}x")
            entry["bench_seconds"] = time.perf_counter() - t0
            fp32.close()
            int8.close()
            doc["wall_s"] = time.perf_counter() - t_start
            (args.out / "int8_vs_fp32.json").write_text(json.dumps(doc, indent=2, default=str))

    doc["wall_s"] = time.perf_counter() - t_start
    doc["build_s"] = t_built - t_start
    (args.out / "int8_vs_fp32.json").write_text(json.dumps(doc, indent=2, default=str))
    md = markdown(doc)
    (args.out / "int8_vs_fp32.md").write_text(md)
    print()
    print(md)
    log(f"wrote {args.out / 'int8_vs_fp32.json'} and {args.out / 'int8_vs_fp32.md'} "
        f"(build {doc['build_s']:.0f}s, total {doc['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
