"""edgekit-runtime: verify, load, run and benchmark edgekit bundles on a device.

Standard library, numpy, cryptography and OpenCV, plus the one inference library
a bundle needs (imported lazily). Never torch, onnx or the host SDK.
"""

from .api import Model, load
from .bundle import VerifiedBundle, open_bundle, read_manifest_unverified
from .contract.errors import BundleError, EngineError, ErrorCode, InputError, RuntimeConfigError, RuntimeErrorBase
from .contract.manifest import Manifest
from .keyring import Keyring

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "EngineError",
    "ErrorCode",
    "InputError",
    "Keyring",
    "Manifest",
    "Model",
    "RuntimeConfigError",
    "RuntimeErrorBase",
    "VerifiedBundle",
    "__version__",
    "load",
    "open_bundle",
    "read_manifest_unverified",
]
