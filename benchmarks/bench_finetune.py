"""Fine-tuning from the embedded model (`--init default`): wall time per epoch and peak RSS, CE vs
CASD at batch 32 (the default) and 16, through the CLI and inside QGIS.

The chips come from tests/test_finetune.py's real-AID training map (8 × 8 cells of 150 px AID
train images at 1 m, 16 block polygons in four new classes), cut at 150 px with a 75 px stride
(144 chips, all train; validation is carved from them by whole polygons, as the trainer does).
Every run is a fresh child process on the CPU: `casd train` (a), or a headless QgsApplication
running `casd:train` through processing.run (b), with the same settings (the backbone thawed
from the first step: the most memory a fine-tune takes; the package's 224 px input). Memory is
the peak PSS of the process tree (the trainer and its forked data-loader worker, whose shared
pages a plain RSS sum would count twice), polled from /proc every 100 ms, and the trainer's own
peak RSS (getrusage of the reaped child). Epoch time is the trainer's `epoch_seconds` (the
training loop, without the validation pass), averaged.

    .venv/bin/python benchmarks/bench_finetune.py               # 2 epochs per run, 8 runs
    .venv/bin/python benchmarks/bench_finetune.py --epochs 1 --faces cli
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the training map's builders

QGIS_SCRIPT = r"""
import importlib, json, os, sys
from qgis.core import QgsApplication
app = QgsApplication([], False)
app.initQgis()
sys.path.append(os.path.join(QgsApplication.pkgDataPath(), "python", "plugins"))
from processing.core.Processing import Processing
Processing.initialize()
sys.path.insert(0, {parent!r})
module = importlib.import_module({name!r} + ".plugin.provider")  # the repository is the plugin folder
provider = module.CasdProvider()  # kept referenced: a collected wrapper leaves a provider without ids
QgsApplication.processingRegistry().addProvider(provider)
import processing
processing.run("casd:train", json.loads({parameters!r}))
app.exitQgis()
"""


def tree_pss(root: int) -> int:
    """Proportional set size of a process and all its descendants, now (bytes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
        except (OSError, StopIteration):
            continue
    return total


def make_chips(root: Path) -> Path:
    """The training map of tests/test_finetune.py and its chips (150 px, stride 75 px)."""
    from casd_core.cli import main
    from casd_core.data import default_data_root
    from test_finetune import TRAIN_LAYOUT, build_map, write_block_labels

    train_map = build_map(default_data_root() / "aid150", "train", TRAIN_LAYOUT, root / "train_map.tif")
    labels = write_block_labels(root / "labels.gpkg")
    chips = root / "chips"
    assert main(["chips", str(train_map), "--labels", str(labels), "--class-field", "class", "-o", str(chips),
                 "--tile-size", "150", "--stride", "75", "--unit", "px", "--test-fraction", "0", "--quiet"]) == 0
    return chips


def command(face: str, chips: Path, out: Path, method: str, batch: int, epochs: int) -> tuple[list[str], dict]:
    """The child process of one run, and its environment."""
    if face == "cli":
        return [sys.executable, "-m", "casd_core.cli", "train", "--data", str(chips), "--split",
                str(chips / "split.csv"), "--out", str(out), "--init", "default", "--method", method,
                "--epochs", str(epochs), "--batch-size", str(batch), "--device", "cpu"], dict(os.environ)
    from casd_core.losses import METHODS

    parameters = {"DATA_FOLDER": str(chips), "SPLIT_CSV": str(chips / "split.csv"), "INIT_DEFAULT": True,
                  "METHOD": list(METHODS).index(method), "EPOCHS": epochs, "BATCH_SIZE": batch, "DEVICE": 1,
                  "OUTPUT_FOLDER": str(out)}
    script = QGIS_SCRIPT.format(parent=str(REPO.parent), name=REPO.name, parameters=json.dumps(parameters))
    home = out.parent / f"{out.name}-qgis-home"
    (home / "xdg").mkdir(parents=True, mode=0o700)
    env = os.environ | {"QT_QPA_PLATFORM": "offscreen", "QGIS_CUSTOM_CONFIG_PATH": str(home / "qgis"),
                        "XDG_RUNTIME_DIR": str(home / "xdg"), "HOME": str(home)}
    return [sys.executable, "-c", script], env


def measure(argv: list[str], env: dict) -> dict:
    """Run ``argv``; its wall time, the peak PSS of its process tree and the peak RSS of the process."""
    import subprocess

    log = tempfile.TemporaryFile()
    start, peak = time.perf_counter(), 0
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, tree_pss(process.pid))
        time.sleep(0.1)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, for the child's own rusage
    if process.returncode:
        log.seek(0)
        raise SystemExit(f"{' '.join(argv[:4])[:200]} failed (exit status {process.returncode}; -9: killed, "
                         f"e.g. out of memory):\n{log.read().decode()[-3000:]}")
    return {"wall_s": time.perf_counter() - start, "tree_peak": peak, "own_peak": usage.ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 16])
    parser.add_argument("--methods", nargs="+", default=["ce", "casd"])
    parser.add_argument("--faces", nargs="+", default=["cli", "qgis"], choices=["cli", "qgis"])
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        root = Path(tmp)
        chips = make_chips(root)
        print(f"{len((chips / 'split.csv').read_text().splitlines()) - 1} chips in {chips}", flush=True)
        for face in args.faces:
            for batch in args.batch_sizes:
                for method in args.methods:  # CE and CASD back to back: their ratio sees the same load
                    out = root / f"{face}-{method}-{batch}"
                    result = measure(*command(face, chips, out, method, batch, args.epochs))
                    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                    result.update(face=face, method=method, batch=batch,
                                  epoch_s=sum(m["epoch_seconds"] for m in history) / len(history),
                                  images_per_s=sum(m["images_per_s"] for m in history) / len(history))
                    rows.append(result)
                    print(json.dumps(result), flush=True)

    gb = 1024 ** 3
    print(f"\n| face | method | batch | s / epoch | images/s | peak PSS, process tree | peak RSS, trainer "
          f"| wall s ({args.epochs} epochs) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['face']} | {r['method']} | {r['batch']} | {r['epoch_s']:.1f} | {r['images_per_s']:.1f} "
              f"| {r['tree_peak'] / gb:.2f} GiB | {r['own_peak'] / gb:.2f} GiB | {r['wall_s']:.0f} |")
    by_key = {(r["face"], r["batch"], r["method"]): r for r in rows}
    print("\n| face | batch | CASD : CE, s / epoch | CASD : CE, peak PSS |\n|---|---:|---:|---:|")
    for face in args.faces:
        for batch in args.batch_sizes:
            ce, casd = by_key.get((face, batch, "ce")), by_key.get((face, batch, "casd"))
            if ce and casd:
                print(f"| {face} | {batch} | {casd['epoch_s'] / ce['epoch_s']:.2f} | "
                      f"{casd['tree_peak'] / ce['tree_peak']:.2f} |")


if __name__ == "__main__":
    main()
