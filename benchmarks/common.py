"""Shared pieces of the benchmarks: data, models with re-estimated BN, building bundles.

Everything that is expensive to make is cached under ``benchmarks/.cache/`` (gitignored)
next to a small ``*.stamp.json`` that records what it was made from; a cached file is
reused only when its stamp matches, so a change of data, seed or pipeline settings
rebuilds it.

* **Images**: scikit-learn's two shipped sample photos (china.jpg, flower.jpg,
  427x640 RGB), cut into seeded random crops (scale 10–100 % of the area, aspect
  3/4–4/3), horizontally flipped at random and resized to 224x224, then normalized
  with the ImageNet mean/std into float32 NCHW tensors.
  ``calib.npz`` (x: 300 crops, seed 1) is the calibration set of every build;
  ``eval.npz`` (x: 126 other crops, seed 3, + the two full photos stretched to
  224x224) is the benchmark input and the FP32-vs-INT8 agreement set.
* **Models**: torchvision architectures with random weights (``weights=None``,
  ``torch.manual_seed(0)``). With random weights the BatchNorm running statistics
  (mean 0, var 1) do not match the activations and deep layers degenerate, so they
  are re-estimated: train mode, ``momentum=None`` (cumulative average), 20 batches
  of 32 crops (seed 2), then ``eval()``. The state dict goes to
  ``.cache/models/ARCH-bn.pt`` and the build loads it through ``model.checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekit_runtime.fileio import sha256_file

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SIZE = 224

DATA_VERSION = 1
CALIB_COUNT, CALIB_SEED = 300, 1
BN_BATCHES, BN_BATCH, BN_SEED = 20, 32, 2
EVAL_CROPS, EVAL_SEED = 126, 3
MODEL_SEED = 0
TARGETS = ("x86-openvino-cpu", "onnxruntime-cpu")
MODELS = ("resnet18", "resnet50", "mobilenet_v2")

Log = Callable[[str], None]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_header(schema: str, argv: list[str] | None) -> dict[str, str]:
    """The first keys of every result document: its schema, when it was made and the command that made it."""
    return {"schema": f"edgekit-benchmark/{schema}/1",
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])}


def write_results(out: Path, stem: str, doc: dict[str, Any] | None, markdown: Callable[[dict[str, Any]], str],
                  indent: int = 1) -> int:
    """Write ``out/stem.json`` (unless ``doc`` is None: ``--markdown-only`` re-renders from the JSON there) and
    ``out/stem.md``, print the Markdown; the exit status for ``main``."""
    if doc is None:
        doc = json.loads((out / f"{stem}.json").read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(doc, indent=indent, default=str))
    md = markdown(doc)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ensure_importable() -> None:
    """Make ``benchmarks`` importable (the build imports the model factory by name)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


file_sha256 = sha256_file  # (the name the benchmark scripts use)


# What a bundle built here depends on (a change invalidates the cached bundles).
PIPELINE_SOURCES = ("edgekit/__init__.py", "edgekit/build", "edgekit/config",
                    "edgekit/signing.py", "edgekit/data", "edgekit/models",
                    "runtime/edgekit_runtime")


def sources_sha256(*paths: str) -> str:
    """One hash over the Python sources at ``paths`` (files or directories)."""
    h = hashlib.sha256()
    for p in paths:
        path = REPO / p
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
        for f in files:
            h.update(str(f.relative_to(REPO)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def provenance() -> dict[str, Any]:
    """git commit and the uncommitted changes of the code the figures depend on."""
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"git_commit": git("rev-parse", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "edgekit", "runtime", "targets").splitlines(),
            "pipeline_sources_sha256": sources_sha256(*PIPELINE_SOURCES),
            "runtime_sources_sha256": sources_sha256("runtime/edgekit_runtime")}


def _stamp_ok(path: Path, stamp: dict) -> bool:
    sp = path.with_name(path.name + ".stamp.json")
    if not path.exists() or not sp.exists():
        return False
    try:
        return json.loads(sp.read_text()) == json.loads(json.dumps(stamp, default=str))
    except (OSError, ValueError):
        return False


def _write_stamp(path: Path, stamp: dict) -> None:
    path.with_name(path.name + ".stamp.json").write_text(json.dumps(stamp, indent=2, default=str))


# ----------------------------------------------------------------------------- images
def sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.ascontiguousarray(im) for im in load_sample_images().images]  # uint8 HxWx3 RGB


def normalize(batch_u8: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB → float32 NCHW, ImageNet mean/std."""
    x = batch_u8.astype(np.float32) / 255.0
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def random_crops(photos: list[np.ndarray], count: int, seed: int) -> np.ndarray:
    """``count`` random resized crops (uint8 NHWC): scale 0.1–1 of the area, aspect 3/4–4/3, random flip."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(count):
        img = photos[int(rng.integers(len(photos)))]
        h, w = img.shape[:2]
        area = h * w * rng.uniform(0.10, 1.0)
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = int(min(w, max(16, round(np.sqrt(area * ratio)))))
        ch = int(min(h, max(16, round(np.sqrt(area / ratio)))))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        crop = Image.fromarray(img[y0 : y0 + ch, x0 : x0 + cw]).resize((SIZE, SIZE), Image.BILINEAR)
        a = np.asarray(crop)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        out[i] = a
    return out


def full_photos() -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(p).resize((SIZE, SIZE), Image.BILINEAR)) for p in sample_photos()])


def ensure_data(log: Log = log) -> dict[str, Path]:
    """``calib.npz`` and ``eval.npz`` under the cache (made once, seeded)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    calib, evalp = CACHE / "calib.npz", CACHE / "eval.npz"
    stamp = {"data_version": DATA_VERSION, "size": SIZE, "mean": MEAN.tolist(), "std": STD.tolist()}
    cs = {**stamp, "count": CALIB_COUNT, "seed": CALIB_SEED}
    es = {**stamp, "crops": EVAL_CROPS, "seed": EVAL_SEED, "full_photos": 2}
    if not _stamp_ok(calib, cs) or not _stamp_ok(evalp, es):
        log(f"writing {CALIB_COUNT} calibration crops and {EVAL_CROPS}+2 evaluation images from sklearn's sample photos")
        photos = sample_photos()
        np.savez(calib, x=normalize(random_crops(photos, CALIB_COUNT, CALIB_SEED)))
        _write_stamp(calib, cs)
        ev = np.concatenate([random_crops(photos, EVAL_CROPS, EVAL_SEED), full_photos()])
        np.savez(evalp, x=normalize(ev))
        _write_stamp(evalp, es)
    return {"calib": calib, "eval": evalp}


def load_x(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as d:
        return np.ascontiguousarray(d["x"], dtype=np.float32)


# ----------------------------------------------------------------------------- models
def make_model(arch: str):
    """The build's model factory: a torchvision architecture with random weights.

    The build passes the re-estimated state dict as ``model.checkpoint``.
    """
    import torchvision

    return getattr(torchvision.models, arch)(weights=None)


def reestimate_bn(model, batches, log: Log = log):
    """Cumulative-average BatchNorm statistics over ``batches`` (float32 NCHW arrays)."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for i, b in enumerate(batches):
            model(torch.from_numpy(b))
    model.eval()
    for m in bns:
        m.momentum = 0.1  # back to torchvision's default; irrelevant in eval()
    return model


def ensure_checkpoint(arch: str, threads: int, log: Log = log) -> dict[str, Any]:
    """``.cache/models/ARCH-bn.pt``: random weights (seed 0) with BN re-estimated on sample crops."""
    import torch

    path = CACHE / "models" / f"{arch}-bn.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"data_version": DATA_VERSION, "arch": arch, "model_seed": MODEL_SEED, "bn_batches": BN_BATCHES,
             "bn_batch": BN_BATCH, "bn_seed": BN_SEED, "torch": torch.__version__}
    meta_path = path.with_suffix(".json")
    if _stamp_ok(path, stamp) and meta_path.exists():
        return json.loads(meta_path.read_text())
    log(f"{arch}: random weights, re-estimating BatchNorm statistics over {BN_BATCHES}x{BN_BATCH} crops")
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(MODEL_SEED)
    model = make_model(arch)
    photos = sample_photos()
    crops = random_crops(photos, BN_BATCHES * BN_BATCH, BN_SEED)
    reestimate_bn(model, (normalize(crops[i : i + BN_BATCH]) for i in range(0, len(crops), BN_BATCH)), log)
    torch.save(model.state_dict(), path)
    # How healthy are the activations? (random weights: no accuracy, but logits must not be degenerate)
    ev = load_x(ensure_data(log)["eval"])
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(ev[i : i + 32])) for i in range(0, len(ev), 32)]).numpy()
    top1 = logits.argmax(1)
    meta = {
        "arch": arch, "checkpoint": str(path.relative_to(REPO)), "sha256": file_sha256(path),
        "bn_reestimation": {"batches": BN_BATCHES, "batch": BN_BATCH, "seed": BN_SEED, "momentum": None},
        "seconds": time.perf_counter() - t0,
        "eval_logits": {"std_over_classes_mean": float(logits.std(1).mean()),
                        "std_over_images_mean": float(logits.std(0).mean()),
                        "distinct_top1": int(len(np.unique(top1))), "images": int(len(top1))},
    }
    _write_stamp(path, stamp)
    meta_path.write_text(json.dumps(meta, indent=2))
    log(f"{arch}: BN re-estimated in {meta['seconds']:.0f}s; {meta['eval_logits']['distinct_top1']} distinct "
        f"top-1 classes over {len(top1)} eval images")
    return meta


# ----------------------------------------------------------------------------- keys and bundles
def ensure_keys() -> dict[str, Path]:
    from edgekit.signing import generate_keypair

    d = CACHE / "keys"
    priv, pub = d / "edgekit.key", d / "edgekit.pub"
    if not (priv.exists() and pub.exists()):
        generate_keypair(d, overwrite=True)
    return {"private": priv, "public": pub}


def bundle_path(arch: str, target: str, precision: str) -> Path:
    return CACHE / "bundles" / f"{arch}-{target}-{precision}.ekb"


def build_bundle(arch: str, target: str, precision: str, *, threads: int, rebuild: bool = False,
                 log: Log = log) -> dict[str, Any]:
    """Compile ``arch`` for ``target`` with the project's pipeline; reuse a matching cached bundle.

    ``precision`` "int8": the profile's quantization defaults; "fp32": ``quantize.enabled: false``.
    No labelled validation set exists for random weights, so the accuracy budget is disabled.
    """
    import edgekit
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.signing import load_private_key

    ensure_importable()
    data = ensure_data(log)
    ckpt = ensure_checkpoint(arch, threads, log)
    keys = ensure_keys()
    out = bundle_path(arch, target, precision)
    out.parent.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {
        "model.source": "benchmarks.common:make_model",
        "model.kwargs": {"arch": arch},
        "model.checkpoint": str(REPO / ckpt["checkpoint"]),
        "model.name": arch,
        "model.input_shape": [1, 3, SIZE, SIZE],
        "target": target,
        "calibration.source": str(data["calib"]),
        # Random weights: no labels, so no accuracy budget (None in a dotted key would be skipped).
        "accuracy": {"max_accuracy_drop": None},
        "output": str(out),
    }
    if precision == "fp32":
        overrides["quantize"] = {"enabled": False}
    elif precision == "int8":
        # this benchmark measures INT8 against FP32 itself: keep INT8 where the build's latency gate
        # would ship the faster FP32 artifact (benchmarks/build_gates.py measures the gate)
        overrides["latency"] = {"on_slower": "keep_int8"}
        # ... and reports INT8/FP32 agreement itself: the fidelity gate reports here, it does not refuse
        # (random-weight mobile nets miss cosine 0.99 on ONNX Runtime: benchmarks/results/build_gates.json)
        overrides["fidelity"] = {"min_cosine": None}
    else:
        raise ValueError(f"precision {precision!r}")
    stamp = {"edgekit": edgekit.__version__, "overrides": {k: v for k, v in overrides.items() if k != "output"},
             "checkpoint_sha256": ckpt["sha256"], "calib_sha256": file_sha256(data["calib"]),
             "target_yaml_sha256": file_sha256(REPO / "targets" / f"{target}.yaml"),
             "key_pub_sha256": file_sha256(keys["public"]),
             "pipeline_sources_sha256": sources_sha256(*PIPELINE_SOURCES)}
    report_path = out.with_suffix(".report.json")
    if not rebuild and _stamp_ok(out, stamp) and report_path.exists():
        log(f"{arch} {target} {precision}: reusing {out.relative_to(REPO)}")
        return {"bundle": out, "reused": True, "report": json.loads(report_path.read_text()), "checkpoint": ckpt,
                "stamp": stamp}
    log(f"{arch} {target} {precision}: compiling")
    cfg = load_build(None, overrides)
    t0 = time.perf_counter()
    result = compile_model(cfg, load_private_key(keys["private"]),
                           on_step=lambda s: log(f"  {arch} {target} {precision}: {s}"))
    log(f"{arch} {target} {precision}: compiled in {time.perf_counter() - t0:.0f}s -> {out.relative_to(REPO)}")
    _write_stamp(out, stamp)
    shutil.rmtree(out.parent / f"{out.stem}.work", ignore_errors=True)  # intermediate files, GBs in all
    return {"bundle": out, "reused": False, "report": result.report, "checkpoint": ckpt, "stamp": stamp}


def load_bundle(path: Path, threads: int | None):
    import edgekit_runtime

    return edgekit_runtime.load(path, keyring=ensure_keys()["public"], threads=threads)


# ----------------------------------------------------------------------------- graph checks
def inspect_artifact(model) -> dict[str, Any]:
    """What the loaded artifact really contains (is the INT8 graph quantized?)."""
    backend = model.manifest.backend
    path = Path(model.workdir) / backend.artifact
    info: dict[str, Any] = {"artifact": backend.artifact, "precision": backend.precision}
    if backend.name == "onnxruntime":
        import onnx
        import onnxruntime as ort

        m = onnx.load(str(path), load_external_data=False)
        ops: dict[str, int] = {}
        for n in m.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        info["onnx_ops"] = dict(sorted(ops.items()))
        info["quantize_linear"] = ops.get("QuantizeLinear", 0)
        info["dequantize_linear"] = ops.get("DequantizeLinear", 0)
        # The graph ORT actually executes (ORT_ENABLE_ALL, as the engine sets it).
        opt = Path(model.workdir) / "optimized_for_inspection.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(opt)
        so.intra_op_num_threads = 1
        try:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            om = onnx.load(str(opt), load_external_data=False)
            rops: dict[str, int] = {}
            for n in om.graph.node:
                key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                rops[key] = rops.get(key, 0) + 1
            info["optimized_ops"] = dict(sorted(rops.items()))
        except Exception as exc:  # diagnostic only
            info["optimized_ops_error"] = str(exc)
        finally:
            opt.unlink(missing_ok=True)
    elif backend.name == "openvino":
        import re

        xml = path.read_text()
        types = re.findall(r'<layer [^>]*type="([A-Za-z0-9_]+)"', xml)
        ops = {}
        for t in types:
            ops[t] = ops.get(t, 0) + 1
        info["ir_ops"] = dict(sorted(ops.items()))
        info["fake_quantize"] = ops.get("FakeQuantize", 0)
        try:
            def text(ri, key: str) -> str:
                v = ri[key] if key in ri else "?"
                return v.astype(str) if hasattr(v, "astype") else str(v)

            rt = model.engine.compiled.get_runtime_model()
            prec: dict[str, int] = {}
            for op in rt.get_ops():
                ri = op.get_rt_info()
                lt = text(ri, "layerType")
                if lt in ("Convolution", "FullyConnected", "MatMul", "GroupConvolution"):
                    key = f"{lt}:{text(ri, 'runtimePrecision')}:{text(ri, 'primitiveType')}"
                    prec[key] = prec.get(key, 0) + 1
            info["runtime_layer_precisions"] = dict(sorted(prec.items()))
        except Exception as exc:
            info["runtime_layer_precisions_error"] = str(exc)
    return info


def ort_session_like_engine(model, allow_spinning: bool | None = None):
    """An ``onnxruntime.InferenceSession`` on the model's artifact, configured as the engine configures it.

    Mirrors ``edgekit_runtime/engines/onnxruntime_engine.py``: ``intra_op_num_threads`` from the
    options (when set), ``ORT_ENABLE_ALL``, and the providers the engine's session uses.
    ``allow_spinning=False`` additionally sets ``session.intra_op.allow_spinning=0`` (a control
    measurement; the engine leaves ORT's default, spinning on).
    """
    import onnxruntime as ort

    opts = model.engine.options
    so = ort.SessionOptions()
    if opts.threads:
        so.intra_op_num_threads = int(opts.threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if allow_spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    providers = model.engine.session.get_providers()  # what the engine's own session ended up with
    path = Path(model.workdir) / model.manifest.backend.artifact
    return ort.InferenceSession(str(path), sess_options=so, providers=providers)


def ov_compiled_like_engine(model):
    """``core.compile_model(...)`` on the model's artifact with the engine's exact config."""
    import openvino as ov

    device = model.engine.options.device
    path = Path(model.workdir) / model.manifest.backend.artifact
    return ov.Core().compile_model(str(path), device, dict(model.engine.config))


class CpuMonitor:
    """How busy the machine was *apart from this process* between ``start()`` and ``stop()``.

    From /proc/stat (all CPUs) minus this process's own CPU time (os.times): other processes
    sharing the cores are the main source of noise on a shared machine, so every measurement
    records it.
    """

    def __init__(self) -> None:
        self._t0: tuple[float, float, float] | None = None

    @staticmethod
    def _read() -> tuple[float, float, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        try:
            with open("/proc/stat") as fh:
                vals = [int(v) for v in fh.readline().split()[1:]]
        except OSError:
            return (0.0, 0.0, 0.0)
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        total = sum(vals[:8])
        t = os.times()
        return (total / ticks, (total - idle) / ticks, t.user + t.system)

    def start(self) -> "CpuMonitor":
        self._t0 = self._read()
        self._load0 = os.getloadavg()[0]
        return self

    def stop(self) -> dict[str, float]:
        t1 = self._read()
        total, busy, own = (b - a for a, b in zip(self._t0, t1))
        if total <= 0:
            return {}
        return {
            "machine_busy_pct": 100 * busy / total,
            "this_process_pct": 100 * own / total,
            "other_processes_pct": max(0.0, 100 * (busy - own) / total),
            "loadavg_1m_start": self._load0,
            "loadavg_1m_end": os.getloadavg()[0],
        }
