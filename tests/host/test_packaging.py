"""The host wheel: every package and every target profile is inside, and an installed wheel finds the profiles."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE_ROOTS = {"edgekit": REPO / "edgekit", "edgekit_runtime": REPO / "runtime" / "edgekit_runtime",
                 "edgekit._targets": REPO / "targets"}


def build_wheel(source: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("edgekit-*.whl")
    return wheel


def packages_on_disk() -> set[str]:
    """Every folder with an ``__init__.py`` under the package roots, as a dotted name."""
    found = set()
    for name, root in PACKAGE_ROOTS.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join((name, *rel.parts)))
    return found


def test_wheel_holds_every_package_and_every_target_profile(source_copy, tmp_path):
    wheel = build_wheel(source_copy, tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()

    # pyproject.toml lists packages by hand (setuptools' find cannot map targets/ into edgekit), so a
    # package added on disk but not to that list would be missing from the wheel: fail here instead.
    in_wheel = {n[: -len("/__init__.py")].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    missing = packages_on_disk() - in_wheel
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"

    profiles = sorted(p.name for p in (REPO / "targets").glob("*.yaml"))
    assert len(profiles) >= 7
    shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("edgekit/_targets/") and n.endswith(".yaml"))
    assert shipped == profiles


def test_wheel_installed_in_a_clean_venv_lists_every_profile(source_copy, tmp_path):
    """What a user of ``pip install edgekit`` gets: the profiles through importlib.resources, as edgekit reads them.

    Only edgekit's own files are installed (``--no-deps``): torch & co. would take minutes, and the
    lookup needs none of them.
    """
    wheel = build_wheel(source_copy, tmp_path / "dist")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    probe = ("import importlib.resources, json, pathlib; d = importlib.resources.files('edgekit._targets'); "
             "print(json.dumps({'path': str(d), 'is_path': isinstance(d, pathlib.Path), "
             "'profiles': sorted(p.name for p in d.iterdir() if p.name.endswith('.yaml'))}))")
    # -I: nothing from this work tree or the test venv may leak in; the answer must come from the wheel
    out = subprocess.run([str(python), "-I", "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["is_path"] and found["path"].startswith(str(venv)), found
    assert found["profiles"] == sorted(p.name for p in (REPO / "targets").glob("*.yaml"))
