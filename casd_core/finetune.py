"""Fine-tuning from a model package, and the ground scale a new package records.

``casd train --init MODEL`` (``--init default``: the embedded model) starts from a package's
backbone and puts a new head on the run's classes (:func:`casd_core.models.build_model_from_package`);
:func:`resolve_init` finds and fingerprints that package, and :func:`finetune_config` says what
such a run trains (the package's backbone, at its input size). :func:`training_scale` decides what
ground footprint and GSD the new package records, so that ``casd predict`` tiles new rasters
at the scale the model was trained at: the user's ``--tile-footprint``/``--gsd``, else the tile
of the ``casd chips`` folder trained on (its ``chips.gpkg`` metadata), else the init package's
footprint. :func:`set_backbone_frozen` freezes the backbone for ``--freeze-epochs``;
:func:`keep_batch_norm_statistics` keeps the package's normalisation throughout.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from casd_core.errors import CasdError, param

if TYPE_CHECKING:
    from casd_core.train.config import TrainConfig

DEFAULT_INIT = "default"  # ``--init default``: the embedded model
CHIPS_INDEX = "chips.gpkg"  # what ``casd chips`` writes beside split.csv
CHIPS_METADATA = "casd_chips"  # the index layer's metadata item with the chip settings


@dataclass
class InitModel:
    """The package a fine-tune starts from: where it is, its content hash, the package."""

    path: Path
    sha256: str
    package: Any  # casd_core.package.ModelPackage

    def record(self) -> dict[str, Any]:
        """What the new package's ``training`` dict says about where its backbone came from."""
        training = self.package.training or {}
        return {"path": str(self.path), "sha256": self.sha256, "backbone": self.package.backbone,
                "class_names": list(self.package.class_names), "bands": list(self.package.bands),
                "input_size": self.package.input_size,
                "training_seed": training.get("seed"), "training_method": training.get("method")}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_init(init: str | None) -> InitModel | None:
    """The package ``init`` names (``"default"``: the embedded model), loaded; ``None`` for none."""
    if not init:
        return None
    from casd_core.package import ModelPackage, default_model_path

    embedded = str(init) == DEFAULT_INIT
    path = default_model_path() if embedded else Path(init)
    if not path.is_file() and embedded:
        raise CasdError(f"the embedded default model is missing ({path}); reinstall casd_core or choose "
                        f"another {param('init')} model")
    if not path.is_file():
        raise CasdError(f"{param('init')} {path} does not exist; choose a model package (.safetensors) "
                        "written by `casd train`")
    try:
        package = ModelPackage.load(path)
    except CasdError as exc:
        raise CasdError(f"{param('init')}: {exc.template}") from None
    return InitModel(path.resolve(), file_sha256(path), package)


def finetune_config(cfg: TrainConfig, init: InitModel | None) -> TrainConfig:
    """``cfg`` as a fine-tune from ``init`` trains it (unchanged without one), so that the
    recorded config and the fingerprint say what was trained: the package's own backbone,
    whose weights fit no other (one named on purpose, other than the default, is refused
    rather than replaced), and the package's input size (the scale its features were trained
    at, 260 px for a Lite2 package) while ``cfg`` asks for the default one."""
    from casd_core.train.config import TrainConfig  # here: the trainer imports this module

    if init is None:
        return cfg
    own = init.package.backbone
    if cfg.backbone not in (own, TrainConfig.backbone):
        raise CasdError(f"the {param('init')} model {init.path.name} is a {own!r}, not a {cfg.backbone!r}; "
                        f"leave {param('backbone')} unset (or pass {own}) to fine-tune it")
    size = init.package.input_size if cfg.input_size == TrainConfig.input_size else cfg.input_size
    return replace(cfg, backbone=own, input_size=size)


def set_backbone_frozen(model: torch.nn.Module, frozen: bool) -> None:
    """Freeze (or thaw) ``model.backbone``: no gradients, and its dropout layers in eval mode.
    Call after ``model.train()``; the head always trains."""
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(not frozen)
    if frozen:
        model.backbone.eval()


def keep_batch_norm_statistics(model: torch.nn.Module) -> None:
    """Normalise with the package's batch-norm statistics during a fine-tune, thawed or not
    (their scale and shift still learn). Call after ``model.train()``. Switching to the
    batch statistics of a few hundred chips of new imagery at the thaw moves every feature
    under the head trained so far: measured on the NAIP walk-through, the loss doubled and
    validation fell from 93 % to 22 % in the first thawed epoch."""
    for module in model.backbone.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


# --- ground scale ------------------------------------------------------------------------------

def chips_settings(data_root: Path, split_csv: Path | None) -> dict[str, Any] | None:
    """The settings ``casd chips`` stored in the ``chips.gpkg`` beside ``split_csv`` (or in
    ``data_root``); ``None`` when the data is not a chip folder."""
    folders = [p for p in (split_csv.parent if split_csv else None, data_root) if p is not None]
    for folder in dict.fromkeys(Path(f) for f in folders):
        index = folder / CHIPS_INDEX
        if not index.is_file():
            continue
        import pyogrio

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                metadata = pyogrio.read_info(str(index), layer="chips").get("layer_metadata") or {}
            return json.loads(metadata[CHIPS_METADATA])
        except Exception:  # noqa: BLE001 - not a casd chips index after all
            continue
    return None


def chip_footprint_m(settings: dict[str, Any], chip: Path) -> float | None:
    """The ground size (metres, across) of the chips: their ``tile`` setting (``"120 m"``, or
    ``"150 px"`` times the ground size of a pixel of ``chip``)."""
    try:
        size, unit = str(settings["tile"]).split()
        size = float(size)
    except (KeyError, ValueError):
        return None
    if unit == "m":
        return size
    import rasterio

    from casd_core.tiling import pixel_size_m

    with rasterio.open(chip) as src:
        ground = pixel_size_m(src.crs, src.transform, src.width, src.height)
    return size * ground[0] if ground else None


def training_scale(tile_footprint_m: float | None, gsd_m: float | None, input_size: int,
                   data_root: Path, split_csv: Path | None, train_paths: Sequence[Path],
                   init: InitModel | None) -> dict[str, Any]:
    """``tile_footprint_m``, ``gsd_m`` and their ``source`` for the new package.

    Values given (``--tile-footprint``, ``--gsd``) win. Else, on a ``casd chips`` folder, the
    chips' footprint (:func:`chip_footprint_m`), and as ``gsd_m`` the ground size of one
    *network input* pixel, chip footprint / ``input_size``: the chips were resized to
    ``input_size`` in training, so ``casd predict`` resamples tiles to that scale (a tile of the
    footprint becomes ``input_size`` pixels, a larger ``--tile-size`` proportionally more).
    Else, fine-tuning, the init package's footprint. Else unknown (``None``).
    """
    scale: dict[str, Any] = {"tile_footprint_m": tile_footprint_m, "gsd_m": gsd_m, "source": "given"}
    if tile_footprint_m is not None and gsd_m is not None:
        return scale
    settings = chips_settings(Path(data_root), Path(split_csv) if split_csv else None)
    chips = chip_footprint_m(settings, Path(train_paths[0])) if settings and train_paths else None
    if chips:
        scale["source"] = f"chips (tile {settings['tile']})"
        if tile_footprint_m is None:
            scale["tile_footprint_m"] = round(chips, 6)
        if gsd_m is None:
            scale["gsd_m"] = round(chips / input_size, 9)
    elif init is not None and init.package.tile_footprint_m and tile_footprint_m is None:
        scale["source"] = "init model"
        scale["tile_footprint_m"] = float(init.package.tile_footprint_m)
    elif tile_footprint_m is None and gsd_m is None:
        scale["source"] = "unknown"
    return scale
