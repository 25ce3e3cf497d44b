"""Adapts a ``QgsProcessingFeedback`` to the core's progress/cancel protocol (events in, bar and log out)."""

from __future__ import annotations

from qgis.core import QgsProcessingFeedback

from casd_core.progress import Monitor, ProgressEvent


def monitor_for(feedback: QgsProcessingFeedback | None) -> Monitor:
    """A :class:`Monitor` that moves the progress bar with every event and polls Cancel.

    A new step (the next raster of a folder, the next epoch: a new ``item`` or ``stage``) also
    gets one progress-text line, e.g. ``"a.tif: 0/2500 tiles"`` or ``"epoch 3/20: 1/120 steps"``;
    the events within a step only move the bar.
    """
    if feedback is None:
        return Monitor()
    last_step: tuple[str, str] | None = None

    def on_progress(event: ProgressEvent) -> None:
        nonlocal last_step
        feedback.setProgress(100.0 * event.fraction)
        if (event.item, event.stage) != last_step:
            last_step = (event.item, event.stage)
            feedback.setProgressText(event.describe())

    return Monitor(on_progress=on_progress, is_cancelled=feedback.isCanceled)
