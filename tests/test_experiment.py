"""Study rows: config inheritance, every shipped row is a valid config, run + summary."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from casd_core.cli import main
from casd_core.experiment import child_environment, load_row, train_config
from casd_core.package import ModelPackage

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.rglob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_row_is_a_valid_training_config(path: Path, shared_data: Path, tmp_path: Path) -> None:
    row = load_row(path)
    cfg = train_config(row, row.seeds[0], tmp_path, shared_data)
    assert cfg.split_csv is not None and cfg.split_csv.is_file()
    if path.parent.name != "bf16":  # bf16/: a one-seed check of bfloat16 autocast, not a row of a table
        assert len(row.seeds) >= 3


def test_rows_share_the_base_budget_and_override_only_their_choice() -> None:
    ce, casd = load_row(EXPERIMENTS / "aid20" / "ce.toml"), load_row(EXPERIMENTS / "aid20" / "casd.toml")
    fixed = load_row(EXPERIMENTS / "aid20" / "casd_alpha_fixed_0.1.toml")
    for key in ("backbone", "input_size", "epochs", "lr", "batch_size"):
        assert ce.settings[key] == casd.settings[key] == fixed.settings[key]
    assert fixed.settings["loss"]["alpha_mode"] == "fixed" and fixed.settings["negatives"] == "centroid"
    assert fixed.settings["loss"]["label_smoothing"] == casd.settings["loss"]["label_smoothing"]


def test_parallel_runs_on_cpu_share_the_cores_as_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from casd_core.runtime import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert child_environment("cpu", 2)["OMP_NUM_THREADS"] == str(max(1, cpu_threads() // 2))
    assert child_environment("cpu", 64)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    assert child_environment("cpu", 2)["OMP_NUM_THREADS"] == "3"


def test_experiment_runs_seeds_in_parallel_then_summarises(shared_data: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    row = tmp_path / "tiny.toml"
    row.write_text('name = "tiny"\nmethod = "ce"\nsplit = "aid150/split_20.csv"\nepochs = 1\n'
                   'subset_per_class = 3\nbatch_size = 16\nval_fraction = 0.34\ninput_size = 150\nseeds = [0, 1]\n')
    runs = tmp_path / "runs"
    argv = ["experiment", str(row), "--runs", str(runs), "--data", str(shared_data), "--parallel", "2",
            "--loader-workers", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert {"done: tiny seed 0", "done: tiny seed 1"} <= set(out)
    assert out[-1].startswith("| tiny | ce | 2/2 | ") and "±" in out[-1]
    for seed in (0, 1):  # each seed trained in its own process, logging to its run folder
        run = runs / "tiny" / f"seed{seed}"
        assert (run / "model.safetensors").is_file() and (run / "result.json").is_file()
        assert "tiny | ce | 1/1" in (run / "train.log").read_text()
    # finished seeds are not started again
    assert main(argv) == 0
    assert not any(line.startswith("started") for line in capsys.readouterr().out.splitlines())
    # a fine-tune row from seed 0's 150-px package trains at 150 px, as that package did, and
    # is finished, not "trained with other settings", when run again
    tuned = tmp_path / "tuned.toml"
    tuned.write_text(row.read_text().replace('name = "tiny"', 'name = "tuned"').replace("input_size = 150\n", "")
                     .replace("seeds = [0, 1]", f'seeds = [0]\ninit = "{runs / "tiny" / "seed0" / "model.safetensors"}"'))
    tuned_argv = ["experiment", str(tuned), *argv[2:]]
    assert main(tuned_argv) == 0
    assert ModelPackage.load(runs / "tuned" / "seed0" / "model.safetensors").input_size == 150
    capsys.readouterr()
    assert main(tuned_argv) == 0
    assert not any(line.startswith("started") for line in capsys.readouterr().out.splitlines())
    # each finished seed has its record beside the row file: metrics, history, test confusion and
    # its labels for the validation rows
    records = [json.loads((tmp_path / "results" / "tiny" / f"seed{seed}.json").read_text()) for seed in (0, 1)]
    for seed, record in enumerate(records):
        assert record["fingerprint"] == json.loads((runs / "tiny" / f"seed{seed}" / "result.json").read_text())[
            "fingerprint"]
        assert len(record["history"]) == 1 and sum(map(sum, record["test_confusion"])) == 90
        labels = record["validation_labels"]
        assert len(labels["true"]) == len(labels["predicted"]) == record["metrics"]["validation"]["num_samples"] == 30
        replayed = sum(t == p for t, p in zip(labels["true"], labels["predicted"])) / 30
        assert replayed == pytest.approx(record["metrics"]["validation"]["overall_accuracy"])
    assert records[0]["validation_labels"]["carve_sha256"] != records[1]["validation_labels"]["carve_sha256"]
    # --tta scores the finished seeds' test rows once more with the 8 views, once, into a column
    summary = ["experiment", str(row), "--runs", str(runs), "--data", str(shared_data), "--summary-only", "--tta"]
    assert main(summary) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3].startswith("| row | method | seeds done | OA % | TTA OA % |")
    record_paths = [tmp_path / "results" / "tiny" / f"seed{seed}.json" for seed in (0, 1)]
    tta = [json.loads(path.read_text())["tta"] for path in record_paths]
    assert [scores["num_samples"] for scores in tta] == [90, 90]  # 3 test images of each of the 30 classes
    assert f"tiny seed 0: test OA with TTA {100 * tta[0]['overall_accuracy']:.2f} %" in out
    accuracies = [100 * scores["overall_accuracy"] for scores in tta]
    assert out[-1].split(" | ")[4] == f"{statistics.fmean(accuracies):.2f} ± {statistics.stdev(accuracies):.2f}"
    scored = record_paths[0].stat().st_mtime_ns
    assert main(summary) == 0  # kept, not computed again
    assert record_paths[0].stat().st_mtime_ns == scored
    # a seed trained again since: its record is rewritten from the run, and TTA scored anew
    result_path = runs / "tiny" / "seed0" / "result.json"
    result = json.loads(result_path.read_text())
    result["metrics"]["validation"]["best_epoch"] = 0
    result_path.write_text(json.dumps(result))
    assert main(summary) == 0
    rewritten = json.loads(record_paths[0].read_text())
    assert rewritten["metrics"]["validation"]["best_epoch"] == 0 and rewritten["tta"] == tta[0]
    # a seed without its package: a one-line warning, and the others and the table still come
    (runs / "tiny" / "seed1" / "model.safetensors").unlink()
    record = json.loads(record_paths[1].read_text())
    del record["tta"]
    record_paths[1].write_text(json.dumps(record))
    capsys.readouterr()
    assert main(summary) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().startswith("casd experiment: warning: tiny seed 1 has no package")
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.out.splitlines()[-1].split(" | ")[4] == f"{accuracies[0]:.2f} (1/2 seeds)"
    # the run folders gone (a new machine): the records still make the table, and nothing retrains
    shutil.rmtree(runs)
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("started") for line in out) and out[-1].startswith("| tiny | ce | 2/2 | ")
    # the row edited after its seeds finished: they are not its seeds any more, and it says so
    row.write_text(row.read_text().replace("epochs = 1", "epochs = 2"))
    assert main(summary) == 2
    error = capsys.readouterr().err.strip()
    assert f"{record_paths[0]} records a run trained with other settings than {row} gives now" in error
    assert len(error.splitlines()) == 1
