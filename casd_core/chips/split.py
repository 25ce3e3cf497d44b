"""Spatial train/test splits: whole groups of neighbouring chips go to one side.

Neighbouring chips look alike (the same field, the same roofs), so a split per chip at random
lets the test set leak into training. Groups are either

- **polygon**: the chips of one polygon, where polygons of one class are joined when one chip
  overlaps both, or when their chips overlap (a stride smaller than the tile), so no pixel is
  on both sides; or
- **block**: squares of ``block_size`` metres on the raster's CRS grid (chip assigned by its
  centre), which also separates one large polygon into several groups. With a stride smaller
  than the tile, chips on either side of a block edge can share pixels.

:func:`group_split` then holds out whole groups, stratified per class as far as the groups
allow. It is the one group-aware carve-out: the trainer can use it for validation too.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Hashable, Sequence

import numpy as np
import shapely


def polygon_groups(labels: Sequence[str], polygons: Sequence[Sequence[int]],
                   chips_by_crs: Sequence[Sequence[int]], footprints: Sequence,
                   polygon_ids: Sequence[int]) -> list[str]:
    """A group key per chip, ``"polygon:<id>"`` (the smallest FID of its joined polygons).

    ``polygons[i]`` are the label indices chip ``i`` overlaps (its class only);
    ``chips_by_crs`` lists the chips whose footprints share a CRS (overlapping rasters too):
    overlapping footprints of one class join their groups; ``polygon_ids`` are the FIDs of the label indices.
    """
    parent: dict[int, int] = {}

    def find(p: int) -> int:
        parent.setdefault(p, p)
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    def join(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for members in polygons:
        for p in members[1:]:
            join(members[0], p)
    for chips in chips_by_crs:
        if len(chips) < 2:
            continue
        boxes = np.array([footprints[i] for i in chips], dtype=object)
        a, b = shapely.STRtree(boxes).query(boxes, predicate="overlaps")
        for i, j in zip(a, b):
            ci, cj = chips[i], chips[j]
            if labels[ci] == labels[cj]:
                join(polygons[ci][0], polygons[cj][0])
    return [f"polygon:{polygon_ids[find(members[0])]}" for members in polygons]


def block_groups(centres: Sequence[tuple[float, float]], block_units: Sequence[tuple[float, float]],
                 crs_tags: Sequence[str]) -> list[str]:
    """A group key per chip, ``"block:<x>:<y>"``: the square of its centre on the CRS grid
    (``block_units`` is the block's size in CRS units per chip's raster; ``crs_tags`` tell
    rasters in different CRSs apart, empty when there is one)."""
    keys = []
    for (x, y), (bx, by), tag in zip(centres, block_units, crs_tags):
        keys.append(f"block:{tag}{math.floor(x / bx)}:{math.floor(y / by)}")
    return keys


def group_split(labels: Sequence[Hashable], groups: Sequence[Hashable], fraction: float,
                seed: int) -> tuple[list[int], list[int]]:
    """Indices (kept, held out) with whole groups held out: about ``fraction`` of each class.

    Every class keeps at least one group; a class with two or more groups gets at least one
    held-out group when another class does not lose its last kept group by it. Groups are
    tried in a seeded order: first one group per class that has none held out (one of at most
    twice the class's target size where there is one), then any group that brings the held
    share of its classes closer to their targets.
    """
    counts: dict[Hashable, Counter] = defaultdict(Counter)
    for label, group in zip(labels, groups):
        counts[group][label] += 1
    total = Counter(labels)
    groups_of: dict[Hashable, set] = defaultdict(set)
    for group, per_class in counts.items():
        for label in per_class:
            groups_of[label].add(group)
    keys = sorted(counts, key=str)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    target = {label: fraction * n for label, n in total.items()}
    held_groups: set = set()
    held: Counter = Counter()

    def can_hold(group: Hashable) -> bool:
        return group not in held_groups and all(len(groups_of[c] - held_groups - {group}) >= 1
                                                for c in counts[group])

    def hold(group: Hashable) -> None:
        held_groups.add(group)
        held.update(counts[group])

    if fraction > 0:
        for label in sorted(total, key=lambda c: (len(groups_of[c]), str(c))):
            if len(groups_of[label]) < 2 or held[label] > 0:
                continue
            options = [g for g in order if label in counts[g] and can_hold(g)]
            fitting = [g for g in options if counts[g][label] <= max(1.0, 2 * target[label])]
            if fitting or options:
                hold((fitting or sorted(options, key=lambda g: counts[g][label]))[0])
        for group in order:
            if not can_hold(group):
                continue
            gain = sum((abs(held[c] - target[c]) - abs(held[c] + n - target[c])) / total[c]
                       for c, n in counts[group].items())
            if gain > 1e-12:
                hold(group)
    kept = [i for i, g in enumerate(groups) if g not in held_groups]
    out = [i for i, g in enumerate(groups) if g in held_groups]
    return kept, out
