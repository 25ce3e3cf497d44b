"""CASD triplets: every image is an anchor once per epoch, with a same-class positive and a
negative from another class, preferably one the network currently confuses with the anchor's.

How "confusable" is measured is the trainer's choice, made once per epoch: from the
validation confusion matrix (:func:`class_similarity_from_confusion`) or from the cosine
similarity of class-mean embeddings (:func:`class_similarity_from_centroids`). It hands the
matrix to :meth:`TripletSampler.set_class_similarity`; until then, negatives are uniform.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from casd_core.errors import CasdError

STRATEGIES = ("random", "confusion", "centroid")


def _as_numpy(values: np.ndarray | torch.Tensor | Sequence[Any]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def class_similarity_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Class affinity from a confusion matrix of counts (rows: true class, columns: predicted).

    Counts are first turned into per-true-class rates, so a large class does not look more
    confusable only because it has more images; then ``a[i, j] = rate(i→j) + rate(j→i)``,
    the diagonal is zeroed and each row is normalised to sum to 1. A class never confused
    with any other gets a uniform row. Returns a C×C float array.
    """
    conf = np.asarray(confusion, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise CasdError(f"a confusion matrix must be square, got shape {conf.shape}")
    if not np.all(np.isfinite(conf)) or np.any(conf < 0):
        raise CasdError("a confusion matrix must hold finite, non-negative counts")
    num_classes = conf.shape[0]
    if num_classes < 2:
        raise CasdError(f"class similarity needs at least 2 classes, got {num_classes}")
    support = conf.sum(axis=1, keepdims=True)
    rates = np.divide(conf, support, out=np.zeros_like(conf), where=support > 0)
    affinity = rates + rates.T
    np.fill_diagonal(affinity, 0.0)
    return _normalise_rows(affinity)


def class_similarity_from_centroids(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    num_classes: int,
) -> np.ndarray:
    """Cosine similarity of L2-normalised class-mean embeddings.

    ``embeddings`` (N, D), ``labels`` (N,). Negative similarities are clipped to 0 (an
    opposite class is not confusable) and the diagonal is 0. A class with no sample has no
    centroid: its row and column get the mean of the known off-diagonal similarities, so
    it is neither favoured nor avoided as a negative. Returns a symmetric C×C float array.
    """
    emb = _as_numpy(embeddings).astype(np.float64, copy=False)
    lab = _as_numpy(labels).astype(np.int64, copy=False)
    if emb.ndim != 2 or lab.shape != (emb.shape[0],):
        raise CasdError(f"need embeddings (N, D) and labels (N,), got shapes {emb.shape} and {lab.shape}")
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise CasdError(f"labels must lie in [0, {num_classes}), got values from {lab.min()} to {lab.max()}")
    sums = np.zeros((num_classes, emb.shape[1]))
    np.add.at(sums, lab, emb)
    counts = np.bincount(lab, minlength=num_classes)
    present = counts > 0
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    # The direction of a mean is the direction of a sum, so dividing by counts is unnecessary.
    unit = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
    sim = np.clip(unit @ unit.T, 0.0, 1.0)
    np.fill_diagonal(sim, 0.0)
    known = np.outer(present, present) & ~np.eye(num_classes, dtype=bool)
    neutral = sim[known].mean() if known.any() else 1.0
    sim[~present, :] = neutral
    sim[:, ~present] = neutral
    np.fill_diagonal(sim, 0.0)
    return sim


def _normalise_rows(affinity: np.ndarray) -> np.ndarray:
    num_classes = affinity.shape[0]
    uniform = np.full((num_classes, num_classes), 1.0 / (num_classes - 1))
    np.fill_diagonal(uniform, 0.0)
    totals = affinity.sum(axis=1, keepdims=True)
    normalised = np.divide(affinity, totals, out=np.zeros_like(affinity), where=totals > 0)
    return np.where(totals > 0, normalised, uniform)


class TripletSampler(Sampler[tuple[int, int, int]]):
    """Yields ``(anchor, positive, negative)`` dataset indices, one triplet per image per epoch.

    Anchors: every index once, in an order shuffled per epoch. Positive: another index of the
    anchor's class (never the anchor itself). Negative: an index of another class, the class
    drawn with probability ``(1 − uniform_mix) · sim[y, c]^sharpness / Σ + uniform_mix / (K − 1)``
    over the K non-empty classes other than y (strategy ``"random"``, or no similarity yet:
    uniform). ``"confusion"`` and ``"centroid"`` sample alike; the name says which
    similarity the trainer should compute for :meth:`set_class_similarity`. The mix keeps
    every class a possible negative, so a stale or sharp similarity cannot starve one.

    The triplets are a pure function of (seed, epoch, similarity), and anchor order and
    positives depend on (seed, epoch) only, so strategies compare on the same anchors and
    positives. As with ``DistributedSampler``, call :meth:`set_epoch` before each epoch.

    Sharded over ``num_replicas`` ranks (distributed training, ``global_batch`` = ranks ×
    per-rank batch), every rank computes the same epoch of triplets, cuts it as one process
    with batch ``global_batch`` and ``drop_last`` would (whole global batches when there is
    more than one), and takes every ``num_replicas``-th triplet from position ``rank``: the
    ranks' k-th batches together are exactly one process's k-th global batch, and each
    anchor goes to one rank at most once per epoch.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        num_classes: int,
        strategy: str = "random",
        seed: int = 0,
        uniform_mix: float = 0.2,
        sharpness: float = 1.0,
        num_replicas: int = 1,
        rank: int = 0,
        global_batch: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rank < num_replicas:
            raise CasdError(f"rank {rank} is not one of the {num_replicas} replicas")
        if strategy not in STRATEGIES:
            raise CasdError(f"unknown negative sampling strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        if not 0.0 <= uniform_mix <= 1.0:
            raise CasdError(f"uniform_mix must be in [0, 1], got {uniform_mix}")
        if not sharpness >= 0:
            raise CasdError(f"sharpness must be zero or positive, got {sharpness}")
        if seed < 0:
            raise CasdError(f"the sampler seed must be zero or positive, got {seed}")
        labels_array = _as_numpy(labels).astype(np.int64, copy=False).reshape(-1)
        if labels_array.size == 0:
            raise CasdError("the triplet sampler got no labels; the training split is empty")
        if labels_array.min() < 0 or labels_array.max() >= num_classes:
            raise CasdError(f"labels must lie in [0, {num_classes}), got values from {labels_array.min()} to {labels_array.max()}")
        counts = np.bincount(labels_array, minlength=num_classes)
        singletons = np.flatnonzero(counts == 1)
        if singletons.size:
            raise CasdError(
                f"class {int(singletons[0])} has only one training image, so it has no same-class positive; "
                "add images to it or drop the class"
            )
        if np.count_nonzero(counts) < 2:
            raise CasdError("triplets need training images from at least 2 classes")

        self.labels = labels_array
        self.num_classes = num_classes
        self.strategy = strategy
        self.seed = int(seed)
        self.uniform_mix = float(uniform_mix)
        self.sharpness = float(sharpness)
        self.epoch = 0
        self._similarity: np.ndarray | None = None
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.global_batch = global_batch

        self._counts = counts
        # Indices grouped by class: class c owns _by_class[_starts[c] : _starts[c] + _counts[c]].
        self._by_class = np.argsort(labels_array, kind="stable")
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._rank = np.empty_like(self._by_class)
        self._rank[self._by_class] = np.arange(labels_array.size) - self._starts[labels_array[self._by_class]]
        self._negative_probabilities = self._compute_negative_probabilities()

    def __len__(self) -> int:
        """Triplets this rank yields per epoch (all images with one replica)."""
        return self.shard_sizes()[self.rank]

    def shard_sizes(self) -> list[int]:
        """Triplets each rank yields per epoch, in rank order."""
        kept = self.labels.size
        if self.global_batch is not None and kept > self.global_batch:
            kept -= kept % self.global_batch
        return [len(range(r, kept, self.num_replicas)) for r in range(self.num_replicas)]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose triplets the next iteration yields."""
        if epoch < 0:
            raise CasdError(f"epoch must be zero or positive, got {epoch}")
        self.epoch = int(epoch)

    @property
    def class_similarity(self) -> np.ndarray | None:
        """The similarity matrix in use, or None before the first :meth:`set_class_similarity`."""
        return None if self._similarity is None else self._similarity.copy()

    def set_class_similarity(self, sim: np.ndarray | torch.Tensor) -> None:
        """Use ``sim`` (C×C, non-negative; the diagonal is ignored) to weight negative classes."""
        matrix = _as_numpy(sim).astype(np.float64)
        if matrix.shape != (self.num_classes, self.num_classes):
            raise CasdError(f"class similarity must be {self.num_classes}×{self.num_classes}, got shape {matrix.shape}")
        if not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
            raise CasdError("class similarity must be finite and non-negative")
        self._similarity = matrix
        self._negative_probabilities = self._compute_negative_probabilities()

    def negative_class_probabilities(self) -> np.ndarray:
        """C×C: row y is the distribution of the negative's class for an anchor of class y."""
        return self._negative_probabilities.copy()

    def _compute_negative_probabilities(self) -> np.ndarray:
        candidates = (self._counts > 0)[None, :] & ~np.eye(self.num_classes, dtype=bool)
        uniform = candidates / candidates.sum(axis=1, keepdims=True)
        if self.strategy == "random" or self._similarity is None:
            return uniform
        weights = np.where(candidates, self._similarity**self.sharpness, 0.0)
        totals = weights.sum(axis=1, keepdims=True)
        # A row with no similar candidate (all zeros) falls back to uniform rather than dividing by zero.
        weighted = np.divide(weights, totals, out=uniform.copy(), where=totals > 0)
        return (1.0 - self.uniform_mix) * weighted + self.uniform_mix * uniform

    def triplets(self) -> np.ndarray:
        """This epoch's triplets as an (N, 3) int64 array of (anchor, positive, negative)."""
        # Separate streams, so changing the similarity changes the negatives and nothing else.
        order_rng = np.random.default_rng([self.seed, self.epoch, 0])
        positive_rng = np.random.default_rng([self.seed, self.epoch, 1])
        negative_rng = np.random.default_rng([self.seed, self.epoch, 2])

        anchors = order_rng.permutation(self.labels.size)
        anchor_class = self.labels[anchors]

        # Draw among the other count−1 members of the class, then skip over the anchor's own slot.
        offset = positive_rng.integers(0, self._counts[anchor_class] - 1)
        offset += offset >= self._rank[anchors]
        positives = self._by_class[self._starts[anchor_class] + offset]

        cdf = np.cumsum(self._negative_probabilities, axis=1)
        cdf /= cdf[:, -1:]  # exact 1.0 at the end, so u < 1 always lands on a class
        u = negative_rng.random(anchors.size)
        negative_class = np.empty_like(anchor_class)
        for c in np.flatnonzero(self._counts):
            rows = anchor_class == c
            # side="right" skips zero-probability classes (flat steps of the CDF).
            negative_class[rows] = np.searchsorted(cdf[c], u[rows], side="right")
        member = negative_rng.integers(0, self._counts[negative_class])
        negatives = self._by_class[self._starts[negative_class] + member]
        return np.stack([anchors, positives, negatives], axis=1)

    def rank_triplets(self) -> np.ndarray:
        """This rank's share of :meth:`triplets` (all of them with one replica), in order."""
        triplets = self.triplets()
        kept = sum(self.shard_sizes())
        return triplets[:kept][self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for anchor, positive, negative in self.rank_triplets().tolist():
            yield anchor, positive, negative

    def state_dict(self) -> dict[str, Any]:
        """Everything that fixes the triplet stream, as JSON-friendly values."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "strategy": self.strategy,
            "num_classes": self.num_classes,
            "num_anchors": int(self.labels.size),
            "similarity": None if self._similarity is None else self._similarity.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the stream saved by :meth:`state_dict` (same labels and strategy required)."""
        if state["num_classes"] != self.num_classes or state["num_anchors"] != self.labels.size:
            raise CasdError(
                f"the checkpoint's sampler had {state['num_anchors']} images in {state['num_classes']} classes, "
                f"this one has {self.labels.size} in {self.num_classes}; resume with the same training split"
            )
        if state["strategy"] != self.strategy:
            raise CasdError(
                f"the checkpoint sampled negatives with strategy {state['strategy']!r}, this run uses "
                f"{self.strategy!r}; resume with the same strategy"
            )
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))
        if state["similarity"] is None:
            self._similarity = None
            self._negative_probabilities = self._compute_negative_probabilities()
        else:
            self.set_class_similarity(np.asarray(state["similarity"], dtype=np.float64))


class TripletDataset(Dataset[dict[str, Any]]):
    """Loads the images of a :class:`TripletSampler` triplet from a base dataset.

    ``base[i]`` returns ``(image, label)``. Indexed by ``(anchor, positive, negative)``, it
    returns ``{"anchor", "anchor_label", "positive", "positive_label", "negative",
    "negative_label"}``, without the partners that were not asked for (those are never
    loaded, so CE and CS-KD do not pay for images they ignore). A plain int index loads the
    anchor alone.
    """

    def __init__(self, base: Dataset[tuple[Any, int]], with_positive: bool = True, with_negative: bool = True) -> None:
        self.base = base
        self.with_positive = with_positive
        self.with_negative = with_negative

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int | Sequence[int]) -> dict[str, Any]:
        if isinstance(index, (int, np.integer)):
            if self.with_positive or self.with_negative:
                raise CasdError("this triplet dataset needs (anchor, positive, negative) indices; sample it with a TripletSampler")
            anchor, positive, negative = int(index), None, None
        else:
            anchor, positive, negative = (int(i) for i in index)
        image, label = self.base[anchor]
        item: dict[str, Any] = {"anchor": image, "anchor_label": label}
        if self.with_positive:
            item["positive"], item["positive_label"] = self.base[positive]
        if self.with_negative:
            item["negative"], item["negative_label"] = self.base[negative]
        return item
