"""Triplet sampling on AID's real training labels, and the class-similarity matrices."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from casd_core.errors import CasdError
from casd_core.sampling import (
    STRATEGIES,
    TripletDataset,
    TripletSampler,
    class_similarity_from_centroids,
    class_similarity_from_confusion,
)


@pytest.fixture(scope="module")
def train_labels(aid_root: Path) -> tuple[np.ndarray, list[str]]:
    """Integer labels of split_20.csv's training rows, classes in sorted-name order."""
    with open(aid_root / "split_20.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == "train"]
    names = sorted({row["label"] for row in rows})
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[row["label"]] for row in rows]), names


def _sampler(labels: np.ndarray, **kw: object) -> TripletSampler:
    return TripletSampler(labels, int(labels.max()) + 1, **kw)  # type: ignore[arg-type]


def _random_similarity(c: int, seed: int = 0) -> np.ndarray:
    sim = np.random.default_rng(seed).random((c, c))
    return (sim + sim.T) / 2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_triplets_respect_classes_and_cover_every_anchor(train_labels: tuple[np.ndarray, list[str]], strategy: str) -> None:
    labels, names = train_labels
    assert len(names) == 30 and len(labels) == 2000
    sampler = _sampler(labels, strategy=strategy, seed=3)
    sampler.set_class_similarity(_random_similarity(30))
    for epoch in range(3):
        sampler.set_epoch(epoch)
        triplets = np.array(list(sampler))
        assert triplets.shape == (len(sampler), 3) == (2000, 3)
        a, p, n = triplets.T
        assert np.array_equal(np.sort(a), np.arange(2000))  # each image anchors exactly once
        assert not np.array_equal(a, np.arange(2000))  # ...in shuffled order
        assert np.array_equal(labels[p], labels[a]) and not np.any(p == a)
        assert not np.any(labels[n] == labels[a])


def test_iteration_yields_python_int_tuples(train_labels: tuple[np.ndarray, list[str]]) -> None:
    first = next(iter(_sampler(train_labels[0])))
    assert isinstance(first, tuple) and len(first) == 3 and all(type(i) is int for i in first)


def test_positives_vary_and_reach_every_class_mate() -> None:
    labels = np.repeat(np.arange(3), 5)
    sampler = TripletSampler(labels, 3)
    anchor = 6
    seen: set[int] = set()
    for epoch in range(200):
        sampler.set_epoch(epoch)
        t = sampler.triplets()
        seen.add(int(t[t[:, 0] == anchor, 1][0]))
    assert seen == {5, 7, 8, 9}  # uniform over the other members, the anchor excluded


def test_order_is_a_pure_function_of_seed_and_epoch(train_labels: tuple[np.ndarray, list[str]]) -> None:
    labels, _ = train_labels
    a, b = _sampler(labels, seed=7), _sampler(labels, seed=7)
    a.set_epoch(5)
    b.set_epoch(5)
    assert np.array_equal(a.triplets(), b.triplets())
    assert list(a) == list(a)  # iterating again without set_epoch replays the epoch
    b.set_epoch(6)
    assert not np.array_equal(a.triplets()[:, 0], b.triplets()[:, 0])
    c = _sampler(labels, seed=8)
    c.set_epoch(5)
    assert not np.array_equal(a.triplets()[:, 0], c.triplets()[:, 0])


def test_similarity_changes_negatives_only(train_labels: tuple[np.ndarray, list[str]]) -> None:
    labels, _ = train_labels
    uniform, weighted = _sampler(labels, strategy="centroid"), _sampler(labels, strategy="centroid")
    weighted.set_class_similarity(_random_similarity(30) ** 4)
    ta, tb = uniform.triplets(), weighted.triplets()
    assert np.array_equal(ta[:, :2], tb[:, :2])  # strategies compare on the same anchors and positives
    assert not np.array_equal(ta[:, 2], tb[:, 2])


@pytest.mark.parametrize("strategy", ["confusion", "centroid"])
def test_confusable_class_is_preferred_as_negative(train_labels: tuple[np.ndarray, list[str]], strategy: str) -> None:
    labels, names = train_labels
    meadow, farmland = names.index("Meadow"), names.index("Farmland")
    sim = np.full((30, 30), 0.01)
    sim[meadow, farmland] = sim[farmland, meadow] = 1.0
    sampler = _sampler(labels, strategy=strategy, uniform_mix=0.2)

    def farmland_share() -> float:
        hits = total = 0
        for epoch in range(10):
            sampler.set_epoch(epoch)
            t = sampler.triplets()
            neg_class = labels[t[labels[t[:, 0]] == meadow, 2]]
            hits += int(np.sum(neg_class == farmland))
            total += neg_class.size
        return hits / total

    before = farmland_share()  # no similarity yet: uniform over the 29 other classes
    sampler.set_class_similarity(sim)
    after = farmland_share()
    uniform = 1 / 29
    assert before < 3 * uniform
    expected = 0.8 * 1.0 / (1.0 + 28 * 0.01) + 0.2 * uniform  # ≈ 0.63
    assert after == pytest.approx(expected, abs=0.08)
    assert after / uniform > 10

    random = _sampler(labels, strategy="random")
    random.set_class_similarity(sim)
    assert np.allclose(random.negative_class_probabilities()[meadow, np.arange(30) != meadow], uniform)


def test_negative_class_probabilities_formula() -> None:
    labels = np.repeat(np.arange(4), 3)
    labels = labels[labels != 3]  # class 3 has no image: never a negative
    sampler = TripletSampler(labels, 4, strategy="confusion", uniform_mix=0.5, sharpness=2.0)
    assert np.allclose(sampler.negative_class_probabilities()[0], [0, 0.5, 0.5, 0])
    sim = np.array([[9, 1, 3, 5], [1, 9, 0, 5], [3, 0, 9, 5], [5, 5, 5, 0]], dtype=float)
    sampler.set_class_similarity(sim)
    probs = sampler.negative_class_probabilities()
    assert np.allclose(probs.sum(axis=1), 1) and np.allclose(np.diag(probs), 0) and np.allclose(probs[:, 3], 0)
    assert np.allclose(probs[0], [0, 0.5 * 1 / 10 + 0.25, 0.5 * 9 / 10 + 0.25, 0])
    assert np.allclose(probs[1], [0.5 + 0.25, 0, 0.25, 0])  # zero similarity is still reachable via the mix
    flat = TripletSampler(labels, 4, strategy="confusion", sharpness=0.0)
    flat.set_class_similarity(sim)
    assert np.allclose(flat.negative_class_probabilities()[0], [0, 0.5, 0.5, 0])  # sharpness 0 = uniform


def test_state_dict_round_trip_reproduces_triplets(train_labels: tuple[np.ndarray, list[str]]) -> None:
    labels, _ = train_labels
    original = _sampler(labels, strategy="confusion", seed=11)
    original.set_class_similarity(_random_similarity(30))
    original.set_epoch(4)
    state = json.loads(json.dumps(original.state_dict()))  # it must survive a JSON checkpoint

    resumed = _sampler(labels, strategy="confusion", seed=0)
    resumed.load_state_dict(state)
    assert resumed.epoch == 4
    assert np.array_equal(resumed.triplets(), original.triplets())
    assert list(resumed) == list(original)

    with pytest.raises(CasdError, match="strategy"):
        _sampler(labels, strategy="centroid").load_state_dict(state)
    with pytest.raises(CasdError, match="same training split"):
        _sampler(labels[:-10], strategy="confusion").load_state_dict(state)


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(CasdError, match="class 2 has only one"):
        TripletSampler([0, 0, 1, 1, 2], 3)
    with pytest.raises(CasdError, match="at least 2 classes"):
        TripletSampler([0, 0, 0], 3)
    with pytest.raises(CasdError, match="strategy"):
        TripletSampler([0, 0, 1, 1], 2, strategy="hardest")
    with pytest.raises(CasdError, match=r"\[0, 2\)"):
        TripletSampler([0, 0, 2, 2], 2)
    sampler = TripletSampler([0, 0, 1, 1], 2)
    with pytest.raises(CasdError, match="2×2"):
        sampler.set_class_similarity(np.ones((3, 3)))
    with pytest.raises(CasdError, match="non-negative"):
        sampler.set_class_similarity(-np.ones((2, 2)))


def test_ten_thousand_labels_take_milliseconds() -> None:
    labels = np.random.default_rng(0).integers(0, 45, 10_000)
    sampler = TripletSampler(labels, 45, strategy="confusion")
    sampler.set_class_similarity(_random_similarity(45))
    start = time.perf_counter()
    triplets = sampler.triplets()
    elapsed = time.perf_counter() - start
    assert triplets.shape == (10_000, 3)
    assert elapsed < 0.25, f"{elapsed * 1000:.0f} ms"  # a few ms normally; slack for a busy shared CPU


def test_similarity_from_confusion_structure() -> None:
    confusion = np.array([[80, 20, 0], [5, 45, 0], [0, 0, 10]])  # 0↔1 confused, 2 never
    sim = class_similarity_from_confusion(confusion)
    # rates: 0→1 = 0.2, 1→0 = 0.1: one affinity; class 2 falls back to uniform.
    assert np.allclose(sim, [[0, 1, 0], [1, 0, 0], [0.5, 0.5, 0]])
    four = np.array([[10, 3, 1, 0], [0, 10, 0, 0], [0, 0, 10, 0], [0, 0, 4, 6]])
    sim4 = class_similarity_from_confusion(four)
    assert np.allclose(sim4.sum(axis=1), 1) and np.allclose(np.diag(sim4), 0)
    assert sim4[1, 0] == 1.0  # symmetrised: class 1 is confused with 0 only through 0's errors
    assert sim4[3, 2] == 1.0 and sim4[2, 3] > sim4[2, 0]  # 3→2 at 40 % beats 0→2 at 7 %
    with pytest.raises(CasdError, match="square"):
        class_similarity_from_confusion(np.ones((2, 3)))


def test_similarity_from_centroids_structure() -> None:
    embeddings = torch.tensor(
        [[1.0, 0.0], [3.0, 0.1], [1.0, 0.3], [0.9, 0.2], [-1.0, 0.05], [-2.0, -0.1]]
    )  # classes 0 and 1 point the same way, class 2 the opposite way, class 3 is empty
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = class_similarity_from_centroids(embeddings, labels, 4)
    assert sim.shape == (4, 4) and np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 0)
    assert sim[0, 1] > 0.95
    assert sim[0, 2] == 0.0 and sim[1, 2] == 0.0  # opposite directions are clipped, not negative
    neutral = sim[0, 1] * 2 / 6  # mean over the six known off-diagonal entries
    assert np.allclose(sim[3, :3], neutral) and np.allclose(sim[:3, 3], neutral)
    # Fed to a sampler it makes 0 and 1 each other's preferred negatives.
    sampler = TripletSampler(labels.numpy(), 4, strategy="centroid")
    sampler.set_class_similarity(sim)
    assert sampler.negative_class_probabilities()[0].argmax() == 1


class _RecordingDataset(Dataset[tuple[torch.Tensor, int]]):
    """A base dataset whose 'image' is its index, remembering which indices were loaded."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.loaded.append(i)
        return torch.full((3, 2, 2), float(i)), int(self.labels[i])


def test_triplet_dataset_batches_with_sampler(train_labels: tuple[np.ndarray, list[str]]) -> None:
    labels, _ = train_labels
    base = _RecordingDataset(labels)
    dataset = TripletDataset(base)
    assert len(dataset) == 2000
    loader = DataLoader(dataset, batch_size=16, sampler=_sampler(labels, seed=1))
    batch = next(iter(loader))
    assert set(batch) == {"anchor", "anchor_label", "positive", "positive_label", "negative", "negative_label"}
    assert batch["anchor"].shape == (16, 3, 2, 2)
    assert torch.equal(batch["anchor_label"], batch["positive_label"])
    assert not torch.any(batch["anchor_label"] == batch["negative_label"])
    anchors = batch["anchor"][:, 0, 0, 0].long().numpy()
    assert np.array_equal(labels[anchors], batch["anchor_label"].numpy())


def test_triplet_dataset_loads_only_requested_partners(train_labels: tuple[np.ndarray, list[str]]) -> None:
    labels, _ = train_labels
    base = _RecordingDataset(labels)
    item = TripletDataset(base, with_positive=True, with_negative=False)[(5, 6, 7)]
    assert set(item) == {"anchor", "anchor_label", "positive", "positive_label"}
    assert base.loaded == [5, 6]

    base.loaded.clear()
    anchor_only = TripletDataset(base, with_positive=False, with_negative=False)
    assert set(anchor_only[(5, 6, 7)]) == {"anchor", "anchor_label"} and base.loaded == [5]
    assert anchor_only[9]["anchor_label"] == labels[9]
    with pytest.raises(CasdError, match="TripletSampler"):
        TripletDataset(base)[9]
