"""Exceptions that carry a message meant for the user, not a traceback.

An error about a setting names it through :func:`param` rather than by a front end's word
for it: the CLI renders the placeholder as ``--tile-size``, the QGIS dialog as "Tile size",
and plain ``str(error)`` (the Python API) as "tile_size".
"""

from __future__ import annotations

import re
from typing import Callable

_PLACEHOLDER = re.compile("\x00([a-z][a-z0-9_]*)\x00")


def render_params(text: str, name_of: Callable[[str], str] | None = None) -> str:
    """``text`` with each :func:`param` placeholder named by ``name_of(key)`` (default: the key)."""
    name_of = name_of or (lambda key: key)
    return _PLACEHOLDER.sub(lambda match: name_of(match.group(1)), text)


def param(key: str) -> str:
    """A placeholder for the setting ``key`` (a config field name, e.g. ``tile_size``) inside an
    error message; each front end fills in the name its user sees."""
    return f"\x00{key}\x00"


class CasdError(Exception):
    """A user-facing error: the message says what is wrong and what to do.

    The CLI prints it as one line and exits non-zero; the QGIS plugin turns it into a
    ``QgsProcessingException``. ``params`` lists the settings the message names (in order;
    the first is the one at fault), so a front end can phrase them in its own terms.
    """

    @property
    def template(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def params(self) -> list[str]:
        return _PLACEHOLDER.findall(self.template)

    def render(self, name_of: Callable[[str], str] | None = None) -> str:
        """The message with each setting named by ``name_of(key)`` (default: the key itself)."""
        return render_params(self.template, name_of)

    def __str__(self) -> str:
        return self.render()


class Cancelled(CasdError):
    """The caller asked to stop (Ctrl-C, or Cancel in QGIS); nothing was written."""

    def __init__(self, message: str = "cancelled; no output was written") -> None:
        super().__init__(message)
