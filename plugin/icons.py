"""Paths of the plugin's icons (``resources/`` at the plugin root)."""

from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
ICON_SVG = str(RESOURCES / "icon.svg")
