"""One marker per registered target (``target_<name>``), so `-m target_x86_openvino_cpu` runs one."""

from __future__ import annotations


def marker_name(target: str) -> str:
    return "target_" + target.replace("-", "_")


def pytest_configure(config):
    from edgekit.config.targets import available_targets

    for name in available_targets():
        config.addinivalue_line("markers", f"{marker_name(name)}: conformance cases of target {name}")
