"""How long jobs report progress and learn about cancellation, without knowing who asks.

Progress is data: a :class:`ProgressEvent` with fields, never a sentence the other side
parses back. The core never imports ``qgis``: the CLI renders events as a tqdm bar, the
plugin adapts ``QgsProcessingFeedback`` (bar, progress text, Cancel) to a :class:`Monitor`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from casd_core.errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long job.

    ``stage`` names what is counted ("tiles", "rasters", "steps", "images"); ``done`` of
    ``total`` of them are finished; ``fraction`` is the share of the *whole* job done (for a
    folder: across its rasters), in [0, 1]. ``item`` is what is being worked on (a raster's
    name, "epoch 3/20"), empty for a single-item job. ``rate`` is ``stage`` units per second,
    when measured.
    """

    stage: str
    done: int
    total: int
    fraction: float
    item: str = ""
    rate: float | None = None

    def describe(self) -> str:
        """One line for a log: ``"a.tif: 120/2500 tiles (48.0 tiles/s)"``."""
        text = f"{self.done}/{self.total} {self.stage}"
        if self.rate:
            text += f" ({self.rate:.1f} {self.stage}/s)"
        return f"{self.item}: {text}" if self.item else text


@dataclass
class Monitor:
    """Progress sink and cancel flag for a long job.

    ``on_progress(event)`` gets every :class:`ProgressEvent`; ``is_cancelled()`` is polled
    between batches/epochs; ``on_warning(message)`` gets what the user should read although
    the job goes on (e.g. that a raster's values were stretched).
    """

    on_progress: Callable[[ProgressEvent], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    on_warning: Callable[[str], None] | None = None

    def warn(self, message: str) -> None:
        if self.on_warning is not None:
            self.on_warning(message)

    def report(self, stage: str, done: int, total: int, item: str = "",
               rate: float | None = None, fraction: float | None = None) -> None:
        """Send one event; ``fraction`` defaults to ``done / total``."""
        if self.on_progress is None:
            return
        if fraction is None:
            fraction = done / total if total > 0 else 1.0
        self.on_progress(ProgressEvent(stage, done, total, min(max(fraction, 0.0), 1.0),
                                       item, rate))

    def part(self, start: float, span: float, item: str = "") -> "Monitor":
        """A monitor for one part of this job (e.g. one raster of a folder): its events keep
        their counts, get ``item`` when they have none, and their fraction is mapped into
        ``[start, start + span]`` of this job."""
        if self.on_progress is None:
            return Monitor(is_cancelled=self.is_cancelled, on_warning=self.on_warning)
        outer = self.on_progress

        def forward(event: ProgressEvent) -> None:
            outer(replace(event, item=event.item or item,
                          fraction=min(max(start + span * event.fraction, 0.0), 1.0)))

        return Monitor(on_progress=forward, is_cancelled=self.is_cancelled, on_warning=self.on_warning)

    def check_cancelled(self) -> None:
        """Raise :class:`Cancelled` if the caller asked to stop."""
        if self.is_cancelled is not None and self.is_cancelled():
            raise Cancelled()
