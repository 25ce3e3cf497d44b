"""Exceptions that carry a message meant for the user, not a traceback."""


class CasdError(Exception):
    """A user-facing error: the message says what is wrong and what to do.

    The CLI prints it as one line and exits non-zero; the QGIS plugin turns it into a
    ``QgsProcessingException``.
    """


class Cancelled(CasdError):
    """The caller asked to stop (Ctrl-C, or Cancel in QGIS); nothing was written."""

    def __init__(self, message: str = "cancelled; no output was written") -> None:
        super().__init__(message)
