"""Distributed training with torchrun on CPU (gloo, 2 processes) on a small real AID subset:
the sharded sampler, a whole run against one process with the same global batch, and a kill
of one rank mid-epoch followed by the same command resuming."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from casd_core import distributed
from casd_core.cli import main
from casd_core.errors import CasdError
from casd_core.package import ModelPackage
from casd_core.sampling import TripletSampler
from helpers import small_split

REPO = Path(__file__).resolve().parent.parent
# 64 px inputs, 10 train images per class, 2 epochs: a real run that stays short on 2 cores.
RUN_FLAGS = ["--method", "casd", "--epochs", "2", "--input-size", "64", "--val-fraction", "0.2", "--workers", "0"]


def torchrun(*args: str) -> list[str]:
    """The README's ``torchrun --standalone --nproc-per-node 2`` (standalone: a free local
    port, so concurrent test runs do not meet in one rendezvous)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "casd_core.cli", "train", *args]


def run_env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1"}  # one thread per rank: 2 ranks on 2 cores


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sharded_sampler_deals_each_global_batch_of_one_process_to_the_ranks() -> None:
    labels = np.repeat(np.arange(5), 9)  # 45 images
    one = TripletSampler(labels, 5, strategy="centroid", seed=3)
    one.set_epoch(2)
    for batch, world in ((8, 2), (5, 3), (30, 2)):
        shards = []
        for r in range(world):
            sampler = TripletSampler(labels, 5, strategy="centroid", seed=3, num_replicas=world, rank=r,
                                     global_batch=batch * world)
            sampler.set_epoch(2)
            shards.append(sampler.rank_triplets())
            assert len(sampler) == len(shards[-1]) == sampler.shard_sizes()[r]
        whole = one.triplets()
        if len(whole) > batch * world:  # as a DataLoader with drop_last: whole global batches only
            steps = len(whole) // (batch * world)
            assert [len(s) for s in shards] == [steps * batch] * world
            for k in range(steps):
                dealt = np.concatenate([s[k * batch:(k + 1) * batch] for s in shards])
                expected = whole[k * batch * world:(k + 1) * batch * world]
                assert sorted(map(tuple, dealt)) == sorted(map(tuple, expected))
        else:  # one global batch: every image, ceil/floor of N / world per rank
            assert [len(s) for s in shards] == [math.ceil(45 / world), 45 // world]
            assert sorted(map(tuple, np.concatenate(shards))) == sorted(map(tuple, whole))
        anchors = np.concatenate(shards)[:, 0]
        assert len(set(anchors.tolist())) == len(anchors)  # each anchor at most once per epoch
    with pytest.raises(CasdError, match="rank 2"):
        TripletSampler(labels, 5, num_replicas=2, rank=2)


def test_without_torchrun_the_helpers_are_those_of_one_process() -> None:
    import torch

    with distributed.process_group("cpu") as where:
        assert (where.rank, where.world_size, where.is_main) == (0, 1, True)
        assert not distributed.is_distributed()
        counts = torch.tensor([3, 4])
        assert distributed.all_reduce(counts).tolist() == [3, 4]
        assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
        assert distributed.broadcast_object("x") == "x"
        distributed.barrier()


@pytest.fixture(scope="module")
def runs(aid_root: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict:
    """The same run twice: one process with batch 16, and 2 gloo ranks with batch 8 each."""
    work = tmp_path_factory.mktemp("ddp")
    split = small_split(aid_root, work, train_per_class=10, test_per_class=2)
    data = ["--data", str(aid_root), "--split", str(split), *RUN_FLAGS]
    started = time.perf_counter()
    assert main(["train", *data, "--batch-size", "16", "--out", str(work / "one")]) == 0
    one_seconds = time.perf_counter() - started
    started = time.perf_counter()
    two = subprocess.run(torchrun(*data, "--batch-size", "8", "--out", str(work / "two")), cwd=REPO,
                         env=run_env(), capture_output=True, text=True, timeout=600)
    return {"one": work / "one", "two": work / "two", "done": two, "one_s": one_seconds,
            "two_s": time.perf_counter() - started}


def test_two_gloo_processes_finish_and_log_their_shards(runs: dict) -> None:
    done = runs["done"]
    assert done.returncode == 0, done.stderr[-3000:]
    two = runs["two"]
    assert done.stdout.count("model package:") == 1  # rank 0 reports, the other rank is quiet
    log = read_log(two)
    assert [entry["epoch"] for entry in log] == [1, 2]
    # 30 classes × 8 training images (2 per class carved for validation) = 240 anchors,
    # 15 global batches of 16: 120 per rank (ceil and floor of 240 / 2), each once per epoch.
    for entry in log:
        assert entry["world_size"] == 2 and entry["anchors_per_rank"] == [120, 120]
    assert [entry["anchors_per_rank"] for entry in read_log(runs["one"])] == [[240], [240]]
    assert all(entry["world_size"] == 1 for entry in read_log(runs["one"]))
    package = ModelPackage.load(two / "model.safetensors")
    assert package.training["history"] == log and package.metrics["test"]["num_samples"] == 60
    assert json.loads((two / "result.json").read_text())["metrics"] == package.metrics
    assert not list(two.glob(".*.tmp"))  # rank 0 wrote atomically, the other rank wrote nothing


def test_two_processes_learn_as_one_process_with_the_same_global_batch(runs: dict) -> None:
    """Both start from the same weights and see the same 16-anchor global batches; they differ
    only in batch-norm statistics (per rank: 8 anchors × 3 branches), augmentation draws and
    summation order. Epoch 1's loss (averaged over 240 anchors) is a tight check: within 3 %.
    Validation accuracy on 60 images is a noisy number: one run's binomial standard deviation
    is sqrt(p(1 - p) / 60) ≈ 0.06 at p ≈ 0.3, so two runs that differ as much as two seeds
    may differ by ~0.08; the tolerance is 3 such deviations of the difference, 0.25."""
    assert runs["done"].returncode == 0, runs["done"].stderr[-3000:]
    one, two = read_log(runs["one"]), read_log(runs["two"])
    assert two[0]["train_total"] == pytest.approx(one[0]["train_total"], rel=0.03)
    assert two[0]["train_alpha"] == pytest.approx(one[0]["train_alpha"], abs=1e-3)
    p = (one[-1]["val_accuracy"] + two[-1]["val_accuracy"]) / 2
    tolerance = 3 * math.sqrt(2 * p * (1 - p) / 60)
    assert abs(two[-1]["val_accuracy"] - one[-1]["val_accuracy"]) <= tolerance
    assert two[-1]["val_accuracy"] > 4 / 30  # and it learns: well above chance


def _rank_process(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of global rank ``rank`` (its child with ``RANK=rank``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        parent = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun {launcher}")


def test_killing_one_rank_mid_epoch_then_rerunning_resumes(aid_root: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    split = small_split(aid_root, tmp_path, train_per_class=6, test_per_class=1)
    out = tmp_path / "run"
    command = torchrun("--data", str(aid_root), "--split", str(split), *RUN_FLAGS, "--batch-size", "8",
                       "--out", str(out))
    log = out / "metrics.jsonl"
    launcher = subprocess.Popen(command, cwd=REPO, env=run_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().count("\n") >= 1):
        assert launcher.poll() is None, "training ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)  # inside epoch 2
    assert launcher.poll() is None, "training ended before it could be interrupted"
    os.kill(_rank_process(launcher.pid, 1), signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0  # torchrun stops rank 0 too and reports the failure
    first_epoch = log.read_text().splitlines()[0]
    assert not (out / "model.safetensors").exists() and not (out / "result.json").exists()
    # One process cannot continue it: the global batch, and so the schedule, would change.
    assert main(["train", "--data", str(aid_root), "--split", str(split), *RUN_FLAGS, "--batch-size", "8",
                 "--out", str(out)]) == 2
    assert "2 process(es)" in capsys.readouterr().err

    resumed = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr
    lines = log.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert lines[0] == first_epoch
    assert all(json.loads(line)["world_size"] == 2 for line in lines)
    assert ModelPackage.load(out / "model.safetensors").metrics["validation"]["best_epoch"] in (1, 2)
    assert not list(out.glob(".*.tmp"))
