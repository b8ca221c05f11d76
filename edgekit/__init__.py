"""edgekit: compile models per edge device profile and ship signed bundles.

The device side lives in the separate package ``edgekit_runtime``.
"""

__version__ = "0.1.0"
