"""How long jobs report progress and learn about cancellation, without knowing who asks.

The core never imports ``qgis``: the CLI passes a tqdm bar, the plugin adapts
``QgsProcessingFeedback`` to these two plain callables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from casd_core.errors import Cancelled


@dataclass
class Monitor:
    """Progress sink and cancel flag for a long job.

    ``on_progress(fraction, message)`` gets a fraction in [0, 1]; ``is_cancelled()`` is
    polled between batches/epochs.
    """

    on_progress: Callable[[float, str], None] | None = None
    is_cancelled: Callable[[], bool] | None = None

    def progress(self, fraction: float, message: str = "") -> None:
        if self.on_progress is not None:
            self.on_progress(min(max(fraction, 0.0), 1.0), message)

    def check_cancelled(self) -> None:
        """Raise :class:`Cancelled` if the caller asked to stop."""
        if self.is_cancelled is not None and self.is_cancelled():
            raise Cancelled()
