"""Raster inference speed and memory: the model's bound, the pipeline, a naive loop, peak RSS.

On a GeoTIFF mosaicked from ``../shared/data/rasters/test_tiled.tif`` (same CRS and pixel
size, 256-px tiles, JPEG like the source; cached between runs) with EfficientNet-Lite0 at
150 px (random head, so speed only):

(a) model only: in-memory float tensors, the best of batch size × threads × channels_last ×
    glibc malloc settings (default / mallopt-tuned) × OpenMP wait policy (libgomp's default
    spin-then-sleep / PASSIVE), each process-level setting in its own process;
(b) the full pipeline (``classify_raster``: plan, background reads, batched inference,
    GeoPackage write) with the settings that made (a) fastest, 150-px tiles read 1:1;
    also with the default 120 m footprint (480-px windows resampled to 150 px);
(c) a naive loop: read one window, classify it, next (same process settings as (b));
the model and the pipeline again with one CPU-bound process running beside them;
peak RSS of the whole process tree running ``classify_raster`` (150-px tiles, so that even
the small mosaic runs enough batches to reach the steady state) on a small and a huge mosaic.

    .venv/bin/python benchmarks/bench_inference.py                 # full: 10,000² + RSS 2,000²/20,000²
    .venv/bin/python benchmarks/bench_inference.py --quick --size 3000 --rss-sizes 1000,3000
    .venv/bin/python benchmarks/bench_inference.py --gpu            # on a CUDA GPU, see below

``--gpu``: EfficientNet-Lite0 at 224 px on the GPU: (g1) the model-only bound (float16
autocast, channels_last, batches already on the GPU, best batch size); (g2) the pipeline
(``classify_raster``: forked reader processes into pinned slots, copies overlapped with the
model, GeoPackage written) on the 10,000² mosaic at 224-px tiles read 1:1, for a few reader
process counts; the ratio, and the CPU cores the pipeline kept busy (CPU seconds / wall);
(g0) the main process's own work per tile, without the model (tile polygons, labels, columns,
GeoPackage write): a bound on the pipeline whatever the GPU (``--host-bound`` runs it alone,
on any machine).

It competes for the machine's cores with anything else running: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path(os.environ.get("CASD_DATA", REPO.parent / "shared" / "data")) / "rasters" / "test_tiled.tif"
INPUT = 150


# --- data ------------------------------------------------------------------------------------

def mosaic(size: int, cache: Path) -> Path:
    """A size×size GeoTIFF tiling the real raster (mirrored copies, so no seams), cached."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    out = cache / f"mosaic_{size}.tif"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with rasterio.open(SOURCE) as src:
        data = src.read()
        profile = src.profile | {"width": size, "height": size, "tiled": True, "blockxsize": 256,
                                 "blockysize": 256, "compress": "jpeg", "photometric": "ycbcr",
                                 "jpeg_quality": 90, "BIGTIFF": "IF_SAFER"}
    tmp = out.with_suffix(".partial.tif")
    n = data.shape[1]
    with rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, size, n):
            for col in range(0, size, n):
                tile = data
                if (row // n) % 2:
                    tile = tile[:, ::-1, :]
                if (col // n) % 2:
                    tile = tile[:, :, ::-1]
                h, w = min(n, size - row), min(n, size - col)
                dst.write(np.ascontiguousarray(tile[:, :h, :w]), window=Window(col, row, w, h))
    os.replace(tmp, out)
    return out


def bench_package(cache: Path) -> Path:
    """EfficientNet-Lite0, 30 classes, 150 px, 120 m footprint (speed only: random head)."""
    out = cache / "bench_lite0_150.safetensors"
    if out.is_file():
        return out
    from casd_core.models import build_model, default_normalization
    from casd_core.package import ModelPackage, default_class_colors

    names = [f"class_{i:02d}" for i in range(30)]
    mean, std = default_normalization("efficientnet_lite0", 3)
    package = ModelPackage(backbone="efficientnet_lite0", class_names=names,
                           class_colors=default_class_colors(names), bands=["red", "green", "blue"],
                           input_size=INPUT, mean=mean, std=std, tile_footprint_m=120.0,
                           state_dict=build_model("efficientnet_lite0", 30, pretrained=None).state_dict())
    return package.save(out)


# --- workers (each in its own process: malloc and OpenMP settings are per process) -----------

def worker_bound(cfg: dict) -> dict:
    import torch

    from casd_core import runtime
    from casd_core.package import ModelPackage

    if cfg["malloc"] == "tuned":
        assert runtime.tune_malloc()
    model = ModelPackage.load(cfg["package"]).build_model()
    results = []
    for threads in cfg["threads"]:
        torch.set_num_threads(threads)
        for channels_last in cfg["channels_last"]:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(memory_format=fmt)
            for batch in cfg["batches"]:
                x = torch.randn(batch, 3, INPUT, INPUT).contiguous(memory_format=fmt)
                with torch.inference_mode():
                    for _ in range(2):
                        model(x)
                    n, start = 0, time.perf_counter()
                    while time.perf_counter() - start < cfg["seconds"] or n < 2 * batch:
                        model(x)
                        n += batch
                    rate = n / (time.perf_counter() - start)
                results.append({"threads": threads, "channels_last": channels_last,
                                "batch": batch, "tiles_per_s": rate})
    return {"results": results}


def own_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker_pipeline(cfg: dict) -> dict:
    from casd_core.inference import InferenceConfig, Predictor, classify_raster
    from casd_core.progress import Monitor, ProgressEvent
    from casd_core.tiling import TilingConfig

    rss_at: dict[str, float] = {}

    def sample(event: ProgressEvent) -> None:  # this process's RSS along the run
        for mark in (0.1, 0.5, 1.0):
            if event.done >= mark * event.total and f"{mark:.0%}" not in rss_at:
                rss_at[f"{mark:.0%}"] = own_rss_mb()

    start = time.perf_counter()
    predictor = Predictor.from_package(cfg["package"], device="cpu")
    load = time.perf_counter() - start
    classify_from = time.time()
    tiling = TilingConfig(tile_size=cfg["tile_size"], unit=cfg["unit"])
    with tempfile.TemporaryDirectory() as tmp:
        summary = classify_raster(cfg["raster"], Path(tmp) / "out.gpkg", predictor, tiling,
                                  InferenceConfig(batch_size=cfg["batch"], workers=cfg["workers"]),
                                  monitor=Monitor(on_progress=sample))
    return {"tiles": summary.tiles, "seconds": summary.seconds, "model_load_s": load,
            "tiles_per_s": summary.tiles / summary.seconds, "classify_from": classify_from,
            "rss_at": rss_at}


def worker_naive(cfg: dict) -> dict:
    """Read one window, classify it, repeat: what a first script would do."""
    import rasterio
    import torch

    from casd_core import runtime
    from casd_core.package import ModelPackage
    from casd_core.tiling import TilingConfig, tile_grid

    if cfg["malloc"] == "tuned":
        runtime.tune_malloc()
    package = ModelPackage.load(cfg["package"])
    model = package.build_model()
    mean = torch.tensor(package.mean).view(3, 1, 1)
    std = torch.tensor(package.std).view(3, 1, 1)
    grid = tile_grid(cfg["raster"], TilingConfig(tile_size=INPUT, unit="px"), package)
    n, start = 0, time.perf_counter()
    with rasterio.open(cfg["raster"]) as ds, torch.inference_mode():
        for tile in grid:
            x = (torch.from_numpy(ds.read(window=tile.window)).float() / 255 - mean) / std
            torch.softmax(model(x[None]), 1).argmax(1).item()
            n += 1
            if n >= cfg["max_tiles"]:
                break
    return {"tiles": n, "tiles_per_s": n / (time.perf_counter() - start)}


def worker_gpu_bound(cfg: dict) -> dict:
    """Model-only tiles/s on the GPU: float16 autocast, channels_last, inputs already there."""
    import torch

    from casd_core.package import ModelPackage

    device = torch.device(cfg["device"])
    model = ModelPackage.load(cfg["package"]).build_model().to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    results = []
    for batch in cfg["batches"]:
        x = torch.randn(batch, 3, cfg["input"], cfg["input"], device=device).contiguous(
            memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16,
                                                    enabled=device.type == "cuda"):
            for _ in range(3):
                model(x)
            synchronize(device)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < cfg["seconds"] or n < 4 * batch:
                model(x)
                n += batch
            synchronize(device)
            results.append({"batch": batch, "tiles_per_s": n / (time.perf_counter() - start)})
    return {"results": results}


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_gpu_pipeline(cfg: dict) -> dict:
    """``classify_raster`` on the GPU; tiles/s over the whole call and after its first tenth,
    and the CPU time of this process and its reader processes."""
    import resource

    from casd_core.inference import InferenceConfig, Predictor, classify_raster
    from casd_core.progress import Monitor, ProgressEvent
    from casd_core.tiling import TilingConfig

    predictor = Predictor.from_package(cfg["package"], device=cfg["device"])
    marks: list[tuple[float, int]] = []

    def on_progress(event: ProgressEvent) -> None:
        marks.append((time.perf_counter(), event.done))

    inference = InferenceConfig(batch_size=cfg["batch"], device=cfg["device"],
                                reader_processes=cfg["processes"])
    tiling = TilingConfig(tile_size=cfg["input"], unit="px")
    with tempfile.TemporaryDirectory() as tmp:
        # a first raster warms up the GPU (cuDNN autotuning, allocator) and the file cache
        classify_raster(cfg["raster"], Path(tmp) / "warm.gpkg", predictor, tiling, inference)
        marks.clear()
        before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        summary = classify_raster(cfg["raster"], Path(tmp) / "out.gpkg", predictor, tiling, inference,
                                  monitor=Monitor(on_progress=on_progress))
        after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
    tenth = next((t, d) for t, d in marks if d >= 0.1 * summary.tiles)
    steady = (summary.tiles - tenth[1]) / max(marks[-1][0] - tenth[0], 1e-9)
    return {"tiles": summary.tiles, "seconds": summary.seconds, "tiles_per_s": summary.tiles_per_second,
            "steady_tiles_per_s": steady, "cpu_seconds": cpu, "cores_busy": cpu / summary.seconds}


def worker_host(cfg: dict) -> dict:
    """Tiles/s of what the pipeline's main process does per tile besides the model: the tile
    polygons, labelling random probabilities in batches, the columns, the GeoPackage write."""
    import torch

    from casd_core import vectorio
    from casd_core.inference.labels import Placed, label
    from casd_core.package import ModelPackage
    from casd_core.tiling import TilingConfig, tile_grid

    package = ModelPackage.load(cfg["package"])
    grid = tile_grid(cfg["raster"], TilingConfig(tile_size=cfg["tile"], unit="px"), package)
    start = time.perf_counter()
    tiles = [tile for _, tile in zip(range(cfg["tiles"]), grid)]
    probabilities = torch.softmax(torch.randn(len(tiles), len(package.class_names)), 1)
    predictions = []
    for i in range(0, len(tiles), cfg["batch"]):
        places = [Placed(t.polygon, t.row, t.col, t.window, 0.0) for t in tiles[i:i + cfg["batch"]]]
        predictions += label(probabilities[i:i + cfg["batch"]], places, package.class_names, "bench")
    with tempfile.TemporaryDirectory() as tmp:
        vectorio.write_predictions(iter(predictions), Path(tmp) / "out.gpkg", grid.crs, "gpkg", package)
    return {"tiles": len(tiles), "tiles_per_s": len(tiles) / (time.perf_counter() - start)}


WORKERS = {"bound": worker_bound, "pipeline": worker_pipeline, "naive": worker_naive,
           "gpu_bound": worker_gpu_bound, "gpu_pipeline": worker_gpu_pipeline, "host": worker_host}


def wait_env(wait: str) -> dict[str, str]:
    """OpenMP's wait policy for a worker: libgomp's default (spin 300,000 times, then sleep)
    or PASSIVE (sleep at once). casd_core.inference asks for PASSIVE unless told otherwise;
    an explicit GOMP_SPINCOUNT overrides OMP_WAIT_POLICY in libgomp, which restores the
    default here."""
    if wait == "passive":
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {"GOMP_SPINCOUNT": "300000"}


def run_worker(kind: str, cfg: dict, env: dict[str, str] | None = None,
               sample_rss: bool = False) -> dict:
    """Run a worker in a fresh process; with ``sample_rss`` also its tree's peak RSS."""
    command = [sys.executable, __file__, "--worker", kind, json.dumps(cfg)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    samples = []
    if sample_rss:
        while proc.poll() is None:
            samples.append((time.time(), tree_rss(proc.pid)))
            time.sleep(0.02)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    if sample_rss:
        result["peak_tree_rss_mb"] = max(rss for _, rss in samples) / 2**20
        result["peak_classify_rss_mb"] = max(
            (rss for t, rss in samples if t >= result["classify_from"]), default=0) / 2**20
    return result


def bench_package_224(cache: Path) -> Path:
    """The benchmark model at 224 px (the GPU mode's input size)."""
    out = cache / "bench_lite0_224.safetensors"
    if out.is_file():
        return out
    from casd_core.package import ModelPackage

    package = ModelPackage.load(bench_package(cache))
    package.input_size = GPU_INPUT
    return package.save(out)


GPU_INPUT = 224


def host_bound(args: argparse.Namespace, package: Path) -> dict:
    """(g0), on up to 20,000 tiles of 32 px over the mosaic (more than its 224-px grid has)."""
    return run_worker("host", {"package": str(package), "raster": str(mosaic(args.size, args.cache)),
                               "tile": 32, "tiles": 20000, "batch": 512})


def main_gpu(args: argparse.Namespace) -> None:
    """The GPU table: model-only bound, pipeline for several reader process counts, ratio."""
    import torch

    if args.host_bound:
        host = host_bound(args, bench_package_224(args.cache))
        print(f"(g0) main process without the model: {host['tiles_per_s']:.0f} tiles/s "
              f"({host['tiles']} tiles; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPU(s))")
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU (or --device cpu for a smoke run of the same code)")
    started = time.perf_counter()
    package = bench_package_224(args.cache)
    raster = mosaic(args.size, args.cache)
    cores = len(os.sched_getaffinity(0))
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    batches = [int(b) for b in args.gpu_batches.split(",")]
    bound = run_worker("gpu_bound", {"package": str(package), "device": args.device, "input": GPU_INPUT,
                                     "batches": batches, "seconds": args.seconds})["results"]
    best = max(bound, key=lambda r: r["tiles_per_s"])
    print(f"  (g1) model only: {[(r['batch'], round(r['tiles_per_s'])) for r in bound]} (batch, tiles/s)",
          flush=True)
    processes = [int(n) for n in args.gpu_processes.split(",")] if args.gpu_processes else sorted(
        {max(1, cores // 4), max(1, cores // 2), max(1, cores - 1)})
    pipes = []
    for n in processes:
        r = run_worker("gpu_pipeline", {"package": str(package), "device": args.device, "raster": str(raster),
                                        "input": GPU_INPUT, "batch": best["batch"], "processes": n})
        pipes.append({**r, "processes": n})
        print(f"  (g2) {n} reader processes: {r['tiles_per_s']:.0f} tiles/s ({r['steady_tiles_per_s']:.0f} "
              f"after the first tenth), {r['cores_busy']:.1f} cores busy", flush=True)
    top = max(pipes, key=lambda r: r["tiles_per_s"])
    host = host_bound(args, package)
    lines = [
        f"mosaic {args.size}×{args.size} px (RGB JPEG tiles), EfficientNet-Lite0 {GPU_INPUT} px read 1:1, "
        f"{name}, {cores} CPU cores, torch {torch.__version__}",
        "",
        "| measurement | setting | tiles/s |",
        "|---|---|---:|",
    ] + [f"| (g1) model only | batch {r['batch']}, float16 autocast, channels_last | {r['tiles_per_s']:.0f} |"
         for r in bound] + [
        f"| (g0) main process without the model | polygons, labels, columns, GeoPackage | "
        f"{host['tiles_per_s']:.0f} |"] + [
        f"| (g2) pipeline, {r['tiles']} tiles, GeoPackage written | {r['processes']} reader processes, "
        f"batch {best['batch']}; {r['cores_busy']:.1f} cores busy; {r['steady_tiles_per_s']:.0f} after "
        f"the first tenth | {r['tiles_per_s']:.0f} |" for r in pipes] + [
        "",
        f"(g2)/(g1) = {top['tiles_per_s'] / best['tiles_per_s']:.2f} with {top['processes']} reader processes "
        f"({top['cores_busy']:.1f} of {cores} cores busy)",
        "", f"total benchmark time {time.perf_counter() - started:.0f} s"]
    print("\n".join(lines))
    (args.cache / "bench_inference_gpu.json").write_text(json.dumps(
        {"bound": bound, "pipelines": pipes, "host": host}, indent=1))


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants, now."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * page
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


# --- orchestration ---------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10000, help="side of the throughput mosaic, px")
    parser.add_argument("--rss-sizes", default="2000,20000", help="sides of the memory mosaics, px")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "casd-bench",
                        help="where mosaics and the benchmark model are kept between runs")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per model-only setting")
    parser.add_argument("--naive-tiles", type=int, default=600, help="tiles timed in the naive loop")
    parser.add_argument("--rounds", type=int, default=3, help="alternating (a)/(b) runs for the ratio")
    parser.add_argument("--quick", action="store_true", help="fewer model-only settings")
    parser.add_argument("--gpu", action="store_true", help="the GPU table instead (see the module doc)")
    parser.add_argument("--device", default="cuda", help="with --gpu: the device (cpu: a smoke run)")
    parser.add_argument("--gpu-batches", default="256,512,1024", help="with --gpu: model-only batch sizes")
    parser.add_argument("--host-bound", action="store_true",
                        help="with --gpu: only (g0), the main process's work per tile without the model")
    parser.add_argument("--gpu-processes", default="",
                        help="with --gpu: reader process counts to time (default: cores/4, /2, -1)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, cfg = args.worker
        print(json.dumps(WORKERS[kind](json.loads(cfg))))
        return
    if args.gpu:
        main_gpu(args)
        return

    started = time.perf_counter()
    package = bench_package(args.cache)
    raster = mosaic(args.size, args.cache)
    rss_sizes = [int(s) for s in args.rss_sizes.split(",") if s]
    rss_rasters = {s: mosaic(s, args.cache) for s in rss_sizes}
    print(f"mosaics ready in {time.perf_counter() - started:.0f} s; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPU(s)", flush=True)

    # (a) the model's bound
    batches = [16, 32] if args.quick else [1, 8, 16, 32, 64]
    bound = []
    for malloc in ("default", "tuned"):
        for wait in ("default", "passive"):
            cfg = {"package": str(package), "malloc": malloc, "threads": [1, 2],
                   "channels_last": [False, True], "batches": batches, "seconds": args.seconds}
            res = run_worker("bound", cfg, wait_env(wait))
            for r in res["results"]:
                bound.append({**r, "malloc": malloc, "wait": wait})
            best_here = max(res["results"], key=lambda r: r["tiles_per_s"])
            print(f"  (a) malloc {malloc:<7} OMP wait {wait:<7}: best {best_here['tiles_per_s']:.0f} tiles/s "
                  f"(batch {best_here['batch']}, {best_here['threads']} threads, "
                  f"channels_last {best_here['channels_last']})", flush=True)
    best = max(bound, key=lambda r: r["tiles_per_s"])
    env = {**wait_env(best["wait"]), "OMP_NUM_THREADS": str(best["threads"]),
           "CASD_MALLOC_TUNING": "1" if best["malloc"] == "tuned" else "0"}

    # (b) the pipeline with those settings, alternating with the bound's setting again so a
    # passing load on the shared machine hits both alike (medians); (c) the naive loop
    common = {"package": str(package), "raster": str(raster), "batch": best["batch"], "workers": 1}
    best_cfg = {"package": str(package), "malloc": best["malloc"], "threads": [best["threads"]],
                "channels_last": [best["channels_last"]], "batches": [best["batch"]],
                "seconds": args.seconds}
    pipes, bounds = [], []
    for _ in range(args.rounds):
        bounds.append(run_worker("bound", best_cfg, wait_env(best["wait"]))["results"][0]["tiles_per_s"])
        pipes.append(run_worker("pipeline", {**common, "tile_size": INPUT, "unit": "px"}, env))
    pipe = sorted(pipes, key=lambda r: r["tiles_per_s"])[len(pipes) // 2]
    bound_rate = sorted(bounds)[len(bounds) // 2]
    print(f"  (b) pipeline: {[round(r['tiles_per_s']) for r in pipes]} tiles/s, bound again "
          f"{[round(b) for b in bounds]}", flush=True)
    pipe_m = run_worker("pipeline", {**common, "tile_size": 120, "unit": "m"}, env)
    naive = run_worker("naive", {"package": str(package), "raster": str(raster),
                                 "malloc": best["malloc"], "max_tiles": args.naive_tiles}, env)
    print(f"  (c) naive: {naive['tiles_per_s']:.0f} tiles/s", flush=True)

    # the same with one CPU-bound process beside it (another job, QGIS rendering, ...)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy_bound = run_worker("bound", {"package": str(package), "malloc": best["malloc"],
                                          "threads": sorted({1, best["threads"], os.cpu_count() or 1}),
                                          "channels_last": [best["channels_last"]],
                                          "batches": [best["batch"]], "seconds": args.seconds}, wait_env(best["wait"]))
        busy_pipe = run_worker("pipeline", {**common, "tile_size": INPUT, "unit": "px"}, env)
    finally:
        hog.kill()
        hog.wait()
    busy = {r["threads"]: r["tiles_per_s"] for r in busy_bound["results"]}
    print(f"  busy machine: model {busy} tiles/s by threads, pipeline {busy_pipe['tiles_per_s']:.0f}", flush=True)

    # peak RSS of the process tree
    rss = {}
    for size, path in rss_rasters.items():
        rss[size] = run_worker("pipeline", {**common, "raster": str(path), "tile_size": INPUT, "unit": "px"},
                               env, sample_rss=True)

    def setting(r: dict) -> str:
        return (f"batch {r['batch']}, {r['threads']} thr, {'channels_last' if r['channels_last'] else 'NCHW'}, "
                f"malloc {r['malloc']}, OMP wait {r['wait']}")

    default_cfg = next(r for r in bound if r["malloc"] == "default" and r["wait"] == "default"
                       and r["threads"] == 2 and not r["channels_last"] and r["batch"] == 32)
    lines = [
        f"mosaic {args.size}×{args.size} px (RGB JPEG tiles, EPSG:28992, 0.25 m), EfficientNet-Lite0 "
        f"{INPUT} px, CPU, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end",
        "",
        "| measurement | setting | tiles/s |",
        "|---|---|---:|",
        f"| (a) model only, torch defaults | {setting(default_cfg)} | {default_cfg['tiles_per_s']:.0f} |",
        f"| (a) model only, best = bound | {setting(best)} | {best['tiles_per_s']:.0f} |",
        f"| (a) the bound's setting again, median of {args.rounds} runs between the (b) runs | same | "
        f"{bound_rate:.0f} |",
        f"| (b) pipeline, {INPUT}-px tiles (1:1 reads), median of {args.rounds} | same, 1 reader thread, "
        f"{pipe['tiles']} tiles, GeoPackage written | {pipe['tiles_per_s']:.0f} |",
        f"| (b') pipeline, 120 m tiles (480-px reads → {INPUT} px) | same, {pipe_m['tiles']} tiles | "
        f"{pipe_m['tiles_per_s']:.0f} |",
        f"| (c) naive loop, one tile at a time | batch 1, same process settings, {naive['tiles']} tiles "
        f"| {naive['tiles_per_s']:.0f} |",
        "",
        f"(b)/(a) = {pipe['tiles_per_s'] / best['tiles_per_s']:.2f} against the best (a), "
        f"{pipe['tiles_per_s'] / bound_rate:.2f} against (a) measured between the (b) runs   "
        f"(b)/(c) = {pipe['tiles_per_s'] / naive['tiles_per_s']:.1f}",
        "",
        "With one CPU-bound process running beside it (same settings, 150-px tiles):",
        "",
        "| measurement | tiles/s |",
        "|---|---:|",
    ] + [f"| (a) model only, {t} thread(s) | {rate:.0f} |" for t, rate in sorted(busy.items())] + [
        f"| (b) pipeline (ThreadTuner picks the thread count) | {busy_pipe['tiles_per_s']:.0f} |",
        "",
        f"| raster | tiles ({INPUT} px) | seconds | peak RSS of the process tree, whole run | "
        "… while classifying | RSS at 10% / 50% / 100% of the tiles |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for size, r in rss.items():
        along = " / ".join(f"{r['rss_at'].get(m, 0):.0f}" for m in ("10%", "50%", "100%"))
        lines.append(f"| {size:,}² px | {r['tiles']} | {r['seconds']:.1f} | {r['peak_tree_rss_mb']:.0f} MB "
                     f"| {r['peak_classify_rss_mb']:.0f} MB | {along} MB |")
    if len(rss) >= 2:
        sizes = sorted(rss)
        whole = rss[sizes[-1]]["peak_tree_rss_mb"] - rss[sizes[0]]["peak_tree_rss_mb"]
        classify = rss[sizes[-1]]["peak_classify_rss_mb"] - rss[sizes[0]]["peak_classify_rss_mb"]
        lines += ["", f"RSS growth {sizes[0]:,}² → {sizes[-1]:,}²: {whole:+.0f} MB (whole run), "
                      f"{classify:+.0f} MB (while classifying)"]
    lines += ["", f"total benchmark time {time.perf_counter() - started:.0f} s"]
    print("\n".join(lines))
    (args.cache / "bench_inference.json").write_text(json.dumps(
        {"bound": bound, "best": best, "bound_again": bounds, "pipelines": pipes, "pipeline": pipe, "pipeline_120m": pipe_m, "naive": naive,
         "busy_bound": busy, "busy_pipeline": busy_pipe, "rss": rss}, indent=1))


if __name__ == "__main__":
    main()
