"""Training losses: plain cross-entropy, CS-KD and CASD, behind one interface.

Every loss is an ``nn.Module`` whose ``forward(z1, y1, z2=None, y2=None, z3=None, y3=None,
progress=0.0)`` takes the logits of the anchor (``z1``), of a same-class partner (``z2``) and of
a different-class partner (``z3``) with their labels, and the fraction of training steps done
(``progress``, for a scheduled distillation weight), and returns a :class:`LossOutput`: the
total to back-propagate and a dict of floats for the metrics log. The class attributes
``needs_positive`` / ``needs_negative`` tell the trainer which partners to load.

A learnable margin α is an ``nn.Parameter`` of the loss module, so the trainer optimises
``model.parameters()`` and ``loss.parameters()`` together (keep weight decay off the loss's
parameters: decay would drag α towards the middle of its range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from casd_core.errors import CasdError, param

METHODS = ("ce", "cskd", "casd")
DISTANCES = ("kl", "js")
ALPHA_MODES = ("fixed", "learnable", "adaptive")
DISTILL_SCHEDULES = ("constant", "cosine")
# Field metadata of the settings added after the study: at their default they are left out of
# run fingerprints (:meth:`casd_core.train.TrainConfig.fingerprint`), so runs configured before
# they existed still resume.
AFTER_STUDY = {"after_study": True}


@dataclass
class LossConfig:
    """How the training loss is built (see ``docs/METHOD.md`` for the method and its choices).

    ``method``: ``"ce"`` (plain cross-entropy), ``"cskd"`` (Yun et al. 2020) or ``"casd"``.
    ``temperature`` T softens the distributions that are distilled; distillation terms are
    scaled by T² so their gradients keep the same size whatever T is.
    ``distill_weight`` is λ in ``CE + λ · L_distill``.
    ``detach_partner`` treats the partners' distributions as fixed teachers in CASD (CS-KD
    always detaches, as in its paper).
    ``distance``: ``"kl"`` = KL(p_partner ‖ p_anchor); ``"js"`` = Jensen–Shannon, symmetric and
    bounded by ln 2 ≈ 0.693, so with ``"js"`` a margin α ≥ ln 2 keeps every hinge active.
    ``partner_ce`` adds cross-entropy on the partners with their own labels, averaged with
    the anchor's (the partner images are forwarded anyway, so their labels are free signal).
    ``alpha_mode`` (CASD only): ``"fixed"`` keeps α = ``alpha_init``; ``"learnable"`` and
    ``"adaptive"`` learn α = α_min + (α_max − α_min) · sigmoid(a) starting at ``alpha_init``
    (see :class:`CASDLoss`). ``alpha_target_active`` is the fraction of triplets whose
    margin is violated that the adaptive scheme steers towards. α is in units of the
    unscaled distance d (inside the T² bracket).
    ``distill_schedule`` (CS-KD and CASD): ``"constant"`` keeps λ all run; ``"cosine"`` decays
    it as λ_t = λ · (1 + cos(π·t)) / 2, t the fraction of training steps done
    (:func:`distill_weight_at`): the study's notes say the distillation terms help early in
    training and cost late.

    The defaults are the loss of the shipped model (``experiments/aid20_224/casd.toml``, the
    study's best configuration on validation); ``tests/test_defaults.py`` keeps them in step.
    """

    method: str = "casd"
    temperature: float = 4.0
    distill_weight: float = 1.0
    label_smoothing: float = 0.1
    detach_partner: bool = True
    distance: str = "kl"
    partner_ce: bool = True
    alpha_mode: str = "learnable"
    alpha_init: float = 0.1
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    alpha_target_active: float = 0.1
    distill_schedule: str = field(default="constant", metadata=AFTER_STUDY)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CasdError(f"unknown {param('method')} {self.method!r}; use one of {', '.join(METHODS)}")
        if self.distance not in DISTANCES:
            raise CasdError(f"unknown {param('distance')} {self.distance!r}; use one of {', '.join(DISTANCES)}")
        if self.alpha_mode not in ALPHA_MODES:
            raise CasdError(f"unknown {param('alpha_mode')} {self.alpha_mode!r}; use one of {', '.join(ALPHA_MODES)}")
        if self.distill_schedule not in DISTILL_SCHEDULES:
            raise CasdError(f"unknown {param('distill_schedule')} {self.distill_schedule!r}; use one of "
                            f"{', '.join(DISTILL_SCHEDULES)}")
        if not self.temperature > 0:
            raise CasdError(f"{param('temperature')} must be positive, got {self.temperature}")
        if not self.distill_weight >= 0:
            raise CasdError(f"{param('distill_weight')} must be zero or positive, got {self.distill_weight}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise CasdError(f"{param('label_smoothing')} must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.alpha_target_active <= 1.0:
            raise CasdError(f"{param('alpha_target_active')} is a fraction of triplets and must be in [0, 1], got {self.alpha_target_active}")
        if not 0.0 <= self.alpha_min < self.alpha_max:
            raise CasdError(f"need 0 <= alpha_min < alpha_max, got alpha_min={self.alpha_min}, alpha_max={self.alpha_max}")
        if self.alpha_mode == "fixed":
            if not self.alpha_init >= 0:
                raise CasdError(f"a fixed margin alpha_init must be zero or positive, got {self.alpha_init}")
        elif not self.alpha_min < self.alpha_init < self.alpha_max:
            # The sigmoid parametrisation cannot reach its bounds, so the start must lie inside.
            raise CasdError(
                f"alpha_init={self.alpha_init} must lie strictly between alpha_min={self.alpha_min} "
                f"and alpha_max={self.alpha_max} when alpha_mode is {self.alpha_mode!r}"
            )


@dataclass
class LossOutput:
    """The loss to back-propagate and its named parts as plain floats for a JSON log."""

    total: Tensor
    terms: dict[str, float]


def distribution_distance(teacher_logits: Tensor, student_logits: Tensor, temperature: float, kind: str = "kl") -> Tensor:
    """Per-sample distance ``d(p_teacher, p_student)`` between T-softened class distributions.

    ``p = softmax(z / T)``. ``"kl"``: KL(p_teacher ‖ p_student), the distillation direction
    (the student is pulled towards the teacher). ``"js"``: Jensen–Shannon divergence,
    ``½ KL(p_t ‖ m) + ½ KL(p_s ‖ m)`` with ``m = ½ (p_t + p_s)``. Returns shape ``(N,)``,
    unscaled (no T²). Whether the teacher is detached is the caller's decision.
    """
    # Float32 even under autocast: softmax differences of near-equal distributions underflow in half precision.
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if kind == "kl":
        return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=-1)
    if kind == "js":
        log_m = torch.logsumexp(torch.stack([log_t, log_s]), dim=0) - math.log(2.0)
        kl_tm = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(dim=-1)
        kl_sm = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(dim=-1)
        return 0.5 * (kl_tm + kl_sm)
    raise CasdError(f"unknown distance {kind!r}; use one of {', '.join(DISTANCES)}")


def distill_weight_at(cfg: LossConfig, progress: float) -> float:
    """λ_t, the distillation weight after ``progress`` (the fraction of training steps done,
    clamped to [0, 1]) under ``cfg.distill_schedule``: λ throughout, or λ · (1 + cos(π·t)) / 2."""
    if cfg.distill_schedule == "constant":
        return cfg.distill_weight
    t = min(1.0, max(0.0, float(progress)))
    return cfg.distill_weight * 0.5 * (1.0 + math.cos(math.pi * t))


def _as_floats(**scalars: Tensor) -> dict[str, float]:
    """Scalars for the log, fetched in one device-to-host copy rather than one sync per term."""
    device = next(iter(scalars.values())).device
    values = torch.stack([t.detach().float().reshape(()).to(device) for t in scalars.values()]).cpu().tolist()
    return dict(zip(scalars.keys(), values))


class SceneLoss(nn.Module):
    """Shared plumbing: input checks and the (optionally multi-branch) cross-entropy."""

    needs_positive: bool = False
    needs_negative: bool = False

    def __init__(self, cfg: LossConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise CasdError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.cfg = cfg
        self.num_classes = num_classes

    def _check(self, name: str, z: Tensor | None, y: Tensor | None, batch: int | None = None) -> tuple[Tensor, Tensor]:
        if z is None or y is None:
            raise CasdError(f"the {type(self).__name__} needs the {name} logits and labels; the trainer must load that partner")
        if z.dim() != 2 or z.shape[1] != self.num_classes:
            raise CasdError(f"{name} logits must have shape (batch, {self.num_classes}), got {tuple(z.shape)}; check the model's number of classes")
        if y.shape != (z.shape[0],):
            raise CasdError(f"{name} labels must have shape ({z.shape[0]},), got {tuple(y.shape)}")
        if batch is not None and z.shape[0] != batch:
            raise CasdError(f"{name} batch has {z.shape[0]} samples but the anchor batch has {batch}")
        return z, y

    def _cross_entropy(self, z1: Tensor, y1: Tensor, partners: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """(CE used in the total, anchor-only CE). Partners count only when ``partner_ce``."""
        ls = self.cfg.label_smoothing
        ce_anchor = F.cross_entropy(z1, y1, label_smoothing=ls)
        if not self.cfg.partner_ce or not partners:
            return ce_anchor, ce_anchor
        ces = [ce_anchor] + [F.cross_entropy(z, y, label_smoothing=ls) for z, y in partners]
        return torch.stack(ces).mean(), ce_anchor

    def _with_weight(self, terms: dict[str, float], progress: float) -> dict[str, float]:
        """``terms`` plus ``distill_weight`` (λ_t) when a schedule varies it (a constant λ is
        in the recorded config already)."""
        if self.cfg.distill_schedule == "constant":
            return terms
        return {**terms, "distill_weight": distill_weight_at(self.cfg, progress)}


class CrossEntropyLoss(SceneLoss):
    """Plain cross-entropy on the anchor: ``L = CE(z1, y1)`` (with optional label smoothing).

    The baseline. Partners, if passed, are ignored.
    """

    def forward(
        self,
        z1: Tensor,
        y1: Tensor,
        z2: Tensor | None = None,
        y2: Tensor | None = None,
        z3: Tensor | None = None,
        y3: Tensor | None = None,
        progress: float = 0.0,
    ) -> LossOutput:
        z1, y1 = self._check("anchor", z1, y1)
        ce = F.cross_entropy(z1, y1, label_smoothing=self.cfg.label_smoothing)
        return LossOutput(total=ce, terms=_as_floats(ce=ce, total=ce))


class CSKDLoss(SceneLoss):
    """Class-wise self-knowledge distillation (CS-KD).

    ``L = CE + λ · T² · KL(softmax(z2/T).detach() ‖ softmax(z1/T))``, ``z2`` the logits of
    another image of the anchor's class. Source: S. Yun, J. Park, K. Lee, J. Shin,
    "Regularizing Class-wise Predictions via Self-knowledge Distillation", CVPR 2020. The
    partner is always detached, as in the paper. The paper's CE is on the anchor only
    (``partner_ce=False``); with ``partner_ce=True`` CE is averaged over anchor and partner so
    that CS-KD and CASD differ only by the negative and the margin. ``distance="js"`` swaps
    the KL for Jensen–Shannon (not in the paper; for ablations matching CASD's distance).
    Terms: ``ce``, ``ce_anchor``, ``pull`` (the T²-scaled distillation), ``d_pos``, ``total``
    (= ce + λ_t·pull), and ``distill_weight`` (λ_t) under a ``distill_schedule``.
    """

    needs_positive = True

    def forward(
        self,
        z1: Tensor,
        y1: Tensor,
        z2: Tensor | None = None,
        y2: Tensor | None = None,
        z3: Tensor | None = None,
        y3: Tensor | None = None,
        progress: float = 0.0,
    ) -> LossOutput:
        z1, y1 = self._check("anchor", z1, y1)
        z2, y2 = self._check("positive", z2, y2, batch=z1.shape[0])
        cfg = self.cfg
        ce, ce_anchor = self._cross_entropy(z1, y1, [(z2, y2)])
        d_pos = distribution_distance(z2.detach(), z1, cfg.temperature, cfg.distance)
        pull = cfg.temperature**2 * d_pos.mean()
        total = ce + distill_weight_at(cfg, progress) * pull
        terms = _as_floats(ce=ce, ce_anchor=ce_anchor, pull=pull, d_pos=d_pos.mean(), total=total)
        return LossOutput(total=total, terms=self._with_weight(terms, progress))


class CASDLoss(SceneLoss):
    """Class-aware self-distillation (CASD) with a margin α.

    ``L = CE + λ · L_casd`` with
    ``L_casd = T² · mean[ d(p2, p1) + max(0, d(p2, p1) − d(p3, p1) + α) ]``, where
    ``p_i = softmax(z_i / T)``, ``z1`` the anchor, ``z2`` a same-class image, ``z3`` an image of
    a confusable other class, and ``d`` KL(p_partner ‖ p_anchor) (or Jensen–Shannon). The
    first part pulls the anchor's distribution towards its class mate's, the hinge asks it to
    be closer to the class mate than to the confusable image by at least α. Source: our
    reading of B. Wu, S. Hao, W. Wang, "Class-aware Self-distillation for Remote Sensing Image
    Scene Classification", IEEE JSTARS 2024 (no official code; see ``docs/METHOD.md``).

    α schemes (``alpha_mode``):

    - ``"fixed"``: α = ``alpha_init``, a buffer; the module has no trainable parameters.
    - ``"learnable"``: α = α_min + (α_max − α_min) · sigmoid(a), ``a`` an ``nn.Parameter``
      trained on the total loss. ∂L/∂α = λ · T² · (fraction of active hinges) ≥ 0, so on
      its own this only ever lowers α, towards α_min; the bound is what stops it at α_min
      instead of at zero or below. In effect a margin that anneals from ``alpha_init`` at a
      pace set by the optimiser and by how many triplets violate it.
    - ``"adaptive"``: same parametrisation, but α gets its own objective,
      ``α · (active_fraction − target)`` with the active fraction detached; its gradient
      ``active_fraction − target`` makes gradient descent grow α while fewer than
      ``alpha_target_active`` of the triplets violate the margin and shrink it when more do,
      so the margin widens as the classes separate (the paper's stages 1→3) and settles
      where about ``target`` of the triplets are still active. The hinge uses a detached α,
      so the main loss does not push on α, and the objective is added as
      ``(α − α.detach()) · (active_fraction − target)``: it is worth exactly zero, so
      ``total`` is the same number as in the other modes, and its gradient reaches α only.

    Terms: ``ce``, ``ce_anchor``, ``pull`` (T²·mean d_pos), ``margin`` (T²·mean hinge),
    ``casd`` (pull + margin), ``alpha``, ``active_fraction`` (hinge > 0), ``d_pos``,
    ``d_neg`` (unscaled mean distances), ``total`` (= ce + λ_t·casd), and ``distill_weight``
    (λ_t) under a ``distill_schedule``.
    """

    needs_positive = True
    needs_negative = True

    def __init__(self, cfg: LossConfig, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        if cfg.alpha_mode == "fixed":
            self.register_buffer("alpha_value", torch.tensor(float(cfg.alpha_init)))
        else:
            fraction = (cfg.alpha_init - cfg.alpha_min) / (cfg.alpha_max - cfg.alpha_min)
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(fraction / (1.0 - fraction))))

    def alpha_tensor(self) -> Tensor:
        """α as a 0-d tensor, differentiable with respect to ``alpha_logit`` when learned."""
        cfg = self.cfg
        if cfg.alpha_mode == "fixed":
            return self.alpha_value
        return cfg.alpha_min + (cfg.alpha_max - cfg.alpha_min) * torch.sigmoid(self.alpha_logit)

    @property
    def alpha(self) -> float:
        """The current margin α."""
        return float(self.alpha_tensor().detach())

    def forward(
        self,
        z1: Tensor,
        y1: Tensor,
        z2: Tensor | None = None,
        y2: Tensor | None = None,
        z3: Tensor | None = None,
        y3: Tensor | None = None,
        progress: float = 0.0,
    ) -> LossOutput:
        z1, y1 = self._check("anchor", z1, y1)
        z2, y2 = self._check("positive", z2, y2, batch=z1.shape[0])
        z3, y3 = self._check("negative", z3, y3, batch=z1.shape[0])
        cfg = self.cfg
        ce, ce_anchor = self._cross_entropy(z1, y1, [(z2, y2), (z3, y3)])

        teacher_pos = z2.detach() if cfg.detach_partner else z2
        teacher_neg = z3.detach() if cfg.detach_partner else z3
        d_pos = distribution_distance(teacher_pos, z1, cfg.temperature, cfg.distance)
        d_neg = distribution_distance(teacher_neg, z1, cfg.temperature, cfg.distance)

        alpha = self.alpha_tensor()
        # In adaptive mode α answers only to its own objective below, not to the hinge.
        alpha_in_hinge = alpha.detach() if cfg.alpha_mode == "adaptive" else alpha
        hinge = F.relu(d_pos - d_neg + alpha_in_hinge)
        active_fraction = (hinge > 0).float().mean()

        t2 = cfg.temperature**2
        pull = t2 * d_pos.mean()
        margin = t2 * hinge.mean()
        casd = pull + margin
        total = ce + distill_weight_at(cfg, progress) * casd
        if cfg.alpha_mode == "adaptive":
            total = total + (alpha - alpha.detach()) * (active_fraction.detach() - cfg.alpha_target_active)

        terms = _as_floats(
            ce=ce,
            ce_anchor=ce_anchor,
            pull=pull,
            margin=margin,
            casd=casd,
            alpha=alpha,
            active_fraction=active_fraction,
            d_pos=d_pos.mean(),
            d_neg=d_neg.mean(),
            total=total,
        )
        return LossOutput(total=total, terms=self._with_weight(terms, progress))


_LOSSES: dict[str, type[SceneLoss]] = {"ce": CrossEntropyLoss, "cskd": CSKDLoss, "casd": CASDLoss}


def build_loss(cfg: LossConfig, num_classes: int) -> SceneLoss:
    """The loss module for ``cfg.method``; move it to the model's device with ``.to()``."""
    return _LOSSES[cfg.method](cfg, num_classes)
