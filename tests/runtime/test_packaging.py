"""The device distribution: its wheel holds only the runtime, and the base install runs bundles without the agent extra."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNTIME = REPO / "runtime" / "edgekit_runtime"
GOLDEN = REPO / "tests" / "golden"
AGENT_EXTRA = "pip install 'edgekit-runtime[agent]'"

# Prepended to a subprocess: paho-mqtt behaves as if it were not installed (a device with the base
# edgekit-runtime), whatever this venv holds.
WITHOUT_PAHO = '''
import sys
class _NoPaho:
    def find_spec(self, name, path=None, target=None):
        if name == "paho" or name.startswith("paho."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoPaho())
'''


def run_without_paho(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_PAHO + code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_runtime_wheel_holds_only_the_runtime(source_copy, tmp_path):
    """The device distribution builds on its own (from a copy: no build/ or egg-info in the work tree),
    carries no host code, and needs paho-mqtt only for its [agent] extra."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(source_copy / "runtime")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("edgekit_runtime-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "edgekit_runtime/bundle.py" in names and "edgekit_runtime/agent/mqtt.py" in names
    assert all(n.startswith(("edgekit_runtime/", "edgekit_runtime-")) for n in names), names
    meta = next(n for n in names if n.endswith("METADATA"))
    requires = [line.split(":", 1)[1].strip() for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist")]
    assert not any(pkg in r for r in requires for pkg in ("torch", "onnx ", "edgekit ", "nncf"))
    base = [r for r in requires if "extra ==" not in r]
    assert sorted(r.split(">")[0] for r in base) == ["cryptography", "numpy", "opencv-python-headless"], base
    agent = [r for r in requires if 'extra == "agent"' in r]
    assert any(r.startswith("paho-mqtt") for r in agent) and any(r.startswith("tomli") for r in agent), agent


def test_only_the_agent_imports_paho():
    """Statically: no module of the runtime outside edgekit_runtime/agent/ imports paho, even lazily."""
    offenders = []
    for path in RUNTIME.rglob("*.py"):
        if (RUNTIME / "agent") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(RUNTIME)}: {n}" for n in names if n.split(".")[0] == "paho"]
    assert not offenders


def test_base_runtime_verifies_runs_and_benchmarks_a_bundle_without_paho():
    code = '''
import importlib, json, pkgutil
import numpy as np
import edgekit_runtime
from edgekit_runtime.bench import BenchSettings, run_benchmark

# every runtime module outside the agent imports on a base install
for mod in pkgutil.walk_packages(edgekit_runtime.__path__, "edgekit_runtime."):
    if not mod.name.startswith("edgekit_runtime.agent"):
        importlib.import_module(mod.name)
model = edgekit_runtime.load(sys.argv[1], keyring=sys.argv[2])
out = model.run(np.ones((1, 1, 2, 2), np.float32))
r = run_benchmark(model, settings=BenchSettings(warmup=2, min_queries=10, min_duration_s=0.05, offline_batch=2,
                                                offline_min_batches=2))
print(json.dumps({"outputs": {k: v.tolist() for k, v in out.items()},
                  "queries": r["single_stream"]["inference"]["count"],
                  "paho": sorted(m for m in sys.modules if m.split(".")[0] == "paho")}))
'''
    proc = run_without_paho(code, str(GOLDEN / "v1.0-onnxruntime-matmul.ekb"), str(GOLDEN / "golden.pub"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (logits,) = result["outputs"].values()
    # the golden model is y = flatten(x) @ W + b (restated in test_golden.py): for x = ones, W's column sums + b
    assert logits == [[-0.25, -0.5, 0.375]], logits
    assert result["queries"] >= 10 and result["paho"] == []


def test_agent_names_its_extra_when_paho_is_missing(tmp_path):
    """``edgekit-agent`` exits 3 with one line naming the extra; importing the MQTT side says the same."""
    (tmp_path / "agent.toml").write_text("")  # never read: the extra is checked first
    cli = run_without_paho("from edgekit_runtime.agent.cli import main; sys.exit(main(sys.argv[1:]))",
                           "run", "--config", str(tmp_path / "agent.toml"))
    assert cli.returncode == 3, cli.stderr
    assert AGENT_EXTRA in cli.stderr and "paho-mqtt" in cli.stderr and "Traceback" not in cli.stderr

    imp = run_without_paho("""
try:
    import edgekit_runtime.agent.mqtt
except ImportError as exc:
    print(type(exc).__name__, exc)
""")
    assert imp.returncode == 0, imp.stderr
    assert imp.stdout.startswith("AgentExtraMissing") and AGENT_EXTRA in imp.stdout
