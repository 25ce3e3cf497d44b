"""What ``casd chips`` is asked to do (:class:`ChipConfig`) and what it did (:class:`ChipSummary`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from casd_core.errors import CasdError, param, render_params
from casd_core.style import normalized_color
from casd_core.tiling import TilingConfig

SPLIT_BY = ("polygon", "block")


@dataclass
class ChipConfig:
    """How labelled polygons become training chips.

    ``tile_size`` and ``stride`` are in ``unit`` ("m" on the ground, "px" raster pixels) and
    mean what they mean for ``casd predict`` (the same :func:`casd_core.tiling.tile_grid`, so
    chips are the tiles prediction will see); ``tile_size=None`` takes the recommended
    footprint of ``model`` (``None``: the embedded model; 120 m), or 224 px when there is no
    model file; ``stride=None`` is the tile size (no overlap). A chip is kept when polygons of
    one class cover at least ``min_coverage`` of it and those of other classes at most
    ``max_other_coverage`` (more is a *mixed* chip, dropped and counted), and when at most
    ``nodata_threshold`` of it is nodata by the raster's mask.

    The test split holds whole spatial groups (``split_by``: "polygon", i.e. touching
    same-class polygons whose chips touch or overlap form one group, or "block": squares of
    ``block_size`` metres in the raster's CRS), about ``test_fraction`` of each class's chips,
    drawn with ``seed``. A class with fewer than ``min_chips`` chips, or fewer than two groups
    (so it cannot have a spatial test split), is reported as too few. ``overwrite`` lets a
    non-empty output folder be used: the chips, index and split of an earlier run (as listed
    in its ``split.csv`` and ``chips.gpkg``) are removed first.

    ``class_colors`` (class name → ``#rrggbb``, any case: the analyst's colours, e.g. of the
    labels layer's style) colour the classes it names in ``chips.gpkg``, and are written to
    ``classes.json`` for the model trained on the chips to keep; other classes get defaults.
    """

    tile_size: float | None = None
    unit: str = "m"
    stride: float | None = None
    model: str | os.PathLike | None = None
    min_coverage: float = 0.75
    max_other_coverage: float = 0.02
    nodata_threshold: float = 0.5
    split_by: str = "polygon"
    block_size: float = 1000.0
    test_fraction: float = 0.2
    seed: int = 0
    min_chips: int = 10
    overwrite: bool = False
    class_colors: dict[str, str] | None = None

    def tiling(self, tile_size: float | None = None, unit: str | None = None) -> TilingConfig:
        return TilingConfig(tile_size=self.tile_size if tile_size is None else tile_size,
                            unit=unit or self.unit, stride=self.stride,
                            nodata_threshold=self.nodata_threshold)

    def validate(self) -> None:
        """Raise :class:`CasdError` for a setting that cannot mean anything."""
        self.tiling().validate()
        if not 0.0 < self.min_coverage <= 1.0:
            raise CasdError(f"{param('min_coverage')} {self.min_coverage} must be a fraction in (0, 1], "
                            "e.g. 0.75")
        if not 0.0 <= self.max_other_coverage < 1.0:
            raise CasdError(f"{param('max_other_coverage')} {self.max_other_coverage} must be a "
                            "fraction in [0, 1), e.g. 0.02")
        if self.split_by not in SPLIT_BY:
            raise CasdError(f"{param('split_by')} {self.split_by!r} is not one of {', '.join(SPLIT_BY)}")
        if not (self.block_size > 0 and math.isfinite(self.block_size)):
            raise CasdError(f"{param('block_size')} {self.block_size} must be a positive number of metres")
        if not 0.0 <= self.test_fraction < 1.0:
            raise CasdError(f"{param('test_fraction')} {self.test_fraction} must be a fraction in [0, 1), "
                            "e.g. 0.2")
        if int(self.min_chips) != self.min_chips or self.min_chips < 1:
            raise CasdError(f"{param('min_chips')} {self.min_chips} must be a whole number of at least 1")
        for name, color in (self.class_colors or {}).items():
            if normalized_color(color) is None:
                raise CasdError(f"{param('class_colors')} gives class {name!r} the colour {color!r}; give "
                                "each class a colour as #rrggbb, e.g. #1b7837")


@dataclass
class ClassChips:
    """One class's chips: its folder under the output, chips per split, polygons and groups."""

    folder: str
    train: int = 0
    test: int = 0
    polygons: int = 0
    groups: int = 0

    @property
    def chips(self) -> int:
        return self.train + self.test


@dataclass
class ChipSummary:
    """What :func:`casd_core.chips.make_chips` wrote and what it left out, and why.

    ``polygons_outside`` are the ids (FIDs) of polygons that overlap no raster;
    ``polygons_without_chips`` those that overlap a raster but gave no chip (smaller than a
    tile, or all their chips dropped). ``too_few`` maps a class to why it is too few.
    """

    out_dir: Path
    index: Path
    split_csv: Path
    index_crs: str
    tile: str
    split_by: str
    classes: dict[str, ClassChips]
    polygons: int
    polygons_outside: list[int] = field(default_factory=list)
    polygons_without_chips: list[int] = field(default_factory=list)
    labels_skipped: dict[str, int] = field(default_factory=dict)
    skipped_nodata: int = 0
    dropped_mixed: int = 0
    dropped_low_coverage: int = 0
    too_few: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def chips(self) -> int:
        return sum(c.chips for c in self.classes.values())

    def table(self, name_of: Callable[[str], str] | None = None) -> str:
        """A short plain-text report: one row per class, then what was left out and why.
        ``name_of`` names settings as the reader's front end does (``--min-coverage``)."""
        header = ("class", "folder", "chips", "train", "test", "polygons", "groups")
        rows = [header] + [(name, c.folder, str(c.chips), str(c.train), str(c.test), str(c.polygons),
                            str(c.groups)) for name, c in self.classes.items()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        s = self.settings
        notes = [
            f"{self.chips} chip(s) of {self.tile} in {self.out_dir}; index {self.index.name} "
            f"({self.index_crs}), split {self.split_csv.name} by {self.split_by}; {self.seconds:.1f} s",
            f"left out: {self.dropped_mixed} mixed-class chip(s) (other classes over "
            f"{s.get('max_other_coverage', 0):.0%}, {param('max_other_coverage')}), "
            f"{self.dropped_low_coverage} below {s.get('min_coverage', 0):.0%} coverage "
            f"({param('min_coverage')}), {self.skipped_nodata} over {s.get('nodata_threshold', 0):.0%} "
            f"nodata ({param('nodata_threshold')})",
        ]
        if self.polygons_outside:
            notes.append(f"outside every raster: {len(self.polygons_outside)} of {self.polygons} polygon(s) "
                         f"(ids {_ids(self.polygons_outside)})")
        if self.polygons_without_chips:
            notes.append(f"{len(self.polygons_without_chips)} polygon(s) gave no chip (smaller than a tile, "
                         f"or every chip left out; ids {_ids(self.polygons_without_chips)})")
        for reason, count in self.labels_skipped.items():
            notes.append(f"{count} feature(s) of the labels ignored: {reason}")
        for name, reason in self.too_few.items():
            notes.append(f"too few: {name}: {reason}")
        return render_params("\n".join(lines + [""] + notes), name_of)


def _ids(ids: list[int], shown: int = 10) -> str:
    text = ", ".join(str(i) for i in ids[:shown])
    return text + (f", … ({len(ids) - shown} more)" if len(ids) > shown else "")
