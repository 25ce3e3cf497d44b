"""Adapts a ``QgsProcessingFeedback`` to the core's plain progress/cancel protocol."""

from __future__ import annotations

from qgis.core import QgsProcessingFeedback

from casd_core.progress import Monitor


def monitor_for(feedback: QgsProcessingFeedback | None) -> Monitor:
    """A :class:`Monitor` that drives the progress bar, logs each new step once, and polls Cancel.

    Per-batch tile counts ("120/2500 tiles") only move the bar; a new step (an epoch, the next
    raster of a folder) also gets one line in the log.
    """
    if feedback is None:
        return Monitor()
    from casd_core.inference import parse_tile_progress

    last_step = ""

    def on_progress(fraction: float, message: str) -> None:
        nonlocal last_step
        feedback.setProgress(100.0 * fraction)
        step = message
        if parse_tile_progress(message) is not None:
            step = message.rsplit(" ", 2)[0].rstrip(":") if message.count(" ") >= 2 else ""
        if step and step != last_step:
            last_step = step
            feedback.setProgressText(step)

    return Monitor(on_progress=on_progress, is_cancelled=feedback.isCanceled)
