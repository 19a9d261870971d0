"""The scan core: sites' mergeable statistics (state), the forward-pass driver, finishing, and scan()."""

from .plan import ScanMemoryError
from .result import ScanCancelled, ScanResult
from .run import scan
from .state import BatchLabels, SiteStats, StatsLayout, merge_all

__all__ = ["BatchLabels", "ScanCancelled", "ScanMemoryError", "ScanResult", "SiteStats", "StatsLayout", "merge_all", "scan"]
