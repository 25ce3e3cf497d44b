"""Training chips from labelled polygons: ``casd chips``.

An analyst draws polygons of their own classes over their own rasters;
:func:`make_chips` cuts the rasters into chips where one class covers the tile, writes them
as georeferenced GeoTIFFs in class folders, indexes them in a GeoPackage styled by class (so
QGIS shows where the training data came from; in the analyst's colours when given, which
``classes.json`` keeps for the model) and splits them spatially into train and test, so that
``casd train --data CHIPDIR --split CHIPDIR/split.csv`` trains on them. Modules: ``config``
(settings and summary), ``labels`` (reading, reprojection, folder names, colours), ``grid`` (which
tiles become chips), ``split`` (spatial groups and the group split), ``write`` (files).
"""

from casd_core.chips.config import ChipConfig, ChipSummary, ClassChips
from casd_core.chips.core import make_chips
from casd_core.chips.labels import Labels, folder_names, read_class_colors, read_labels
from casd_core.chips.split import group_split

__all__ = ["ChipConfig", "ChipSummary", "ClassChips", "Labels", "folder_names", "group_split",
           "make_chips", "read_class_colors", "read_labels"]
