"""Adapts a ``QgsProcessingFeedback`` to the core's progress/cancel protocol (events in, bar and log out)."""

from __future__ import annotations

from typing import Callable

from qgis.core import QgsProcessingFeedback

from casd_core.errors import render_params
from casd_core.progress import Monitor, ProgressEvent


def monitor_for(feedback: QgsProcessingFeedback | None,
                name_of: Callable[[str], str] | None = None) -> Monitor:
    """A :class:`Monitor` that moves the progress bar with every event, polls Cancel and logs
    the core's warnings.

    A new step (the next raster of a folder, the next epoch: a new ``item`` or ``stage``) also
    gets one progress-text line, e.g. ``"a.tif: 0/2500 tiles"`` or ``"epoch 3/20: 1/120 steps"``;
    the events within a step only move the bar. A warning is pushed as a warning line, its
    settings named by ``name_of`` (the dialog's labels, see ``algorithms.common.dialog_names``).
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

    def on_warning(message: str) -> None:
        feedback.pushWarning(render_params(message, name_of))

    return Monitor(on_progress=on_progress, is_cancelled=feedback.isCanceled, on_warning=on_warning)
