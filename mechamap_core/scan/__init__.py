"""The scan core: sites' mergeable statistics (state), the forward-pass driver, finishing, and scan()."""

from ..stats import MIN_CATEGORY_TOKENS
from .plan import ScanMemoryError
from .result import ScanCancelled, ScanResult
from .run import scan
from .state import BatchLabels, SiteStats, StatsLayout, merge_all

__all__ = [
    "MIN_CATEGORY_TOKENS",
    "BatchLabels",
    "ScanCancelled",
    "ScanMemoryError",
    "ScanResult",
    "SiteStats",
    "StatsLayout",
    "merge_all",
    "scan",
]
