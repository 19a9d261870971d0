"""MechaMap core: scan every MLP neuron of a transformer for category selectivity (no UI code here)."""

__version__ = "0.1.0"

from .config import ConfigError, ScanConfig, load_config, save_config  # noqa: E402
from .hub import GatedModelError, ModelNotAvailableError, ModelTooLargeError, RemoteCodeRefusedError  # noqa: E402
from .models import LoadedModel, load_model  # noqa: E402
from .scan import ScanCancelled, ScanResult, scan  # noqa: E402
from .scan.plan import ScanMemoryError  # noqa: E402
from .sites import SiteResolutionError  # noqa: E402

__all__ = [
    "ConfigError", "GatedModelError", "LoadedModel", "ModelNotAvailableError", "ModelTooLargeError",
    "RemoteCodeRefusedError", "ScanMemoryError", "ScanConfig", "ScanCancelled", "ScanResult",
    "SiteResolutionError", "load_config", "load_model", "save_config", "scan",
]  # fmt: skip
