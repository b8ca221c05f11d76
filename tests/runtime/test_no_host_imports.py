"""The device runtime never imports the host stack (torch, onnx, nncf, edgekit).

A device has only ``edgekit_runtime``, numpy, cryptography, OpenCV and one
inference library. ``onnxruntime`` is allowed; ``onnx`` (the package) is not.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNTIME = REPO / "runtime" / "edgekit_runtime"
GOLDEN = REPO / "tests" / "golden"
FORBIDDEN = ("torch", "torchvision", "onnx", "nncf", "edgekit")


def forbidden(module: str) -> bool:
    """``onnx`` and ``onnx.x`` are forbidden; ``onnxruntime`` and ``edgekit_runtime`` are not."""
    return any(module == name or module.startswith(name + ".") for name in FORBIDDEN)


def test_forbidden_matches_exact_names_and_submodules_only():
    assert forbidden("onnx") and forbidden("onnx.helper") and forbidden("torch._C") and forbidden("edgekit.cli")
    assert not forbidden("onnxruntime") and not forbidden("onnxruntime.capi")
    assert not forbidden("edgekit_runtime") and not forbidden("torchaudio_like") and not forbidden("nncfx")


_DEVICE_SCRIPT = r"""
import json, sys
import numpy as np
import edgekit_runtime
bundle, pub = sys.argv[1], sys.argv[2]
with edgekit_runtime.load(bundle, keyring=pub) as model:
    health = model.health_check()
    y = model.run(np.zeros((2, 1, 2, 2), dtype=np.float32))["y"]
    top = model.predict(np.array([[255, 0], [0, 255]], dtype=np.uint8))
    describe = model.describe()
print(json.dumps({"modules": sorted(sys.modules), "health": health["ok"], "y": y.tolist(),
                  "top": top[0]["top_k"][0]["label"], "engine": describe["engine"],
                  "runtime_file": edgekit_runtime.__file__}))
"""


def test_loading_and_running_a_bundle_imports_no_host_package(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _DEVICE_SCRIPT, str(GOLDEN / "v1.0-onnxruntime-matmul.ekb"), str(GOLDEN / "golden.pub")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # the work really happened ...
    assert result["health"] is True and result["engine"] == "onnxruntime"
    assert result["y"] == [[0.5, -0.25, 0.125]] * 2
    assert result["top"] in {"zero", "one", "two"}
    assert "onnxruntime" in result["modules"] and "edgekit_runtime.bundle" in result["modules"]
    # ... without the host stack
    assert [m for m in result["modules"] if forbidden(m)] == []


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call):  # importlib.import_module("x") / __import__("x")
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_runtime_sources_import_no_host_package():
    files = sorted(RUNTIME.rglob("*.py"))
    assert RUNTIME / "bundle.py" in files and RUNTIME / "engines" / "onnxruntime_engine.py" in files
    offenders, seen = [], set()
    for file in files:
        for line, module in _imported_modules(ast.parse(file.read_text(), filename=str(file))):
            seen.add(module)
            if forbidden(module):
                offenders.append(f"{file.relative_to(REPO)}:{line}: import {module}")
    assert "onnxruntime" in seen and "cryptography.exceptions" in seen  # the walk does find imports
    assert offenders == []


def test_engine_registry_points_into_the_runtime_package():
    from edgekit_runtime.engines import ENGINES

    for name, target in ENGINES.items():
        module = target.partition(":")[0]
        assert module.startswith("edgekit_runtime.engines."), (name, target)
        assert not forbidden(module)
