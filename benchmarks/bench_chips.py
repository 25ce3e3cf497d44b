"""`casd chips` on a big raster: wall time, chips per second and peak RSS.

The raster is the 10,000² mosaic of ``../shared/data/rasters/test_tiled.tif`` that
``bench_inference.py`` builds (same CRS and 0.25 m pixels, JPEG tiles; cached). The labels are
a grid of square polygons in three classes covering half of it (squares of 480 m, 10 % of
them crossing a class border so that mixed chips are dropped), in EPSG:4326 so they are
reprojected as users' labels are. Chips are 120 m (480 px) at the default stride.

    .venv/bin/python benchmarks/bench_chips.py                 # 10,000² mosaic
    .venv/bin/python benchmarks/bench_chips.py --size 3000     # quicker
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import mosaic, tree_rss  # noqa: E402  (the same cached mosaic and RSS probe)


def labels_over(raster: Path, out: Path, square_m: float = 480.0) -> Path:
    """Squares of three classes over every other cell of a grid, in EPSG:4326."""
    import numpy as np
    import pyogrio.raw
    import rasterio
    import shapely
    from rasterio.warp import transform_geom

    with rasterio.open(raster) as ds:
        left, bottom, right, top = ds.bounds
        crs = ds.crs
    polygons, classes = [], []
    names = ("built-up", "water", "vegetation")
    for i, y in enumerate(np.arange(bottom, top - square_m, square_m)):
        for j, x in enumerate(np.arange(left, right - square_m, square_m)):
            if (i + j) % 2:
                continue
            box = shapely.box(x, y, x + square_m * (1.1 if (i * 7 + j) % 10 == 0 else 1.0), y + square_m)
            polygons.append(shapely.geometry.shape(transform_geom(crs, "EPSG:4326", box.__geo_interface__)))
            classes.append(names[(i + 2 * j) % 3])
    pyogrio.raw.write(str(out), shapely.to_wkb(np.asarray(polygons, dtype=object)),
                      [np.asarray(classes, dtype=object)], ["class"], layer="labels", driver="GPKG",
                      geometry_type="Polygon", crs="EPSG:4326")
    return out


def run(raster: Path, labels: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "casd_core.cli", "chips", str(raster), "--labels", str(labels),
               "--class-field", "class", "-o", str(out), "--quiet"]
    start, peak = time.perf_counter(), 0
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    output = process.stdout.read()
    if process.returncode:
        raise SystemExit(output)
    chips = sum(1 for _ in out.rglob("*.tif"))
    return {"seconds": seconds, "chips": chips, "peak_mb": peak / 2**20, "output": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10000, help="side of the mosaic, px")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "casd-bench")
    args = parser.parse_args()
    raster = mosaic(args.size, args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        labels = labels_over(raster, Path(tmp) / "labels.gpkg")
        result = run(raster, labels, Path(tmp) / "chips")
    print(result["output"].strip().splitlines()[-1] if result["output"].strip() else "")
    print("| mosaic | chips | wall s | chips/s | peak RSS (process tree) |")
    print("|---|---|---|---|---|")
    print(f"| {args.size:,}² px, 0.25 m | {result['chips']:,} | {result['seconds']:.1f} | "
          f"{result['chips'] / result['seconds']:.1f} | {result['peak_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
