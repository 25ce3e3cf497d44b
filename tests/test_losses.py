"""CE, CS-KD and CASD losses: formulas, margin boundary, where gradients go, α schemes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from casd_core.errors import CasdError
from casd_core.losses import (
    CASDLoss,
    CrossEntropyLoss,
    CSKDLoss,
    LossConfig,
    LossOutput,
    build_loss,
    distribution_distance,
)

C = 30  # AID's class count
T = 4.0


def _batch(n: int = 8, seed: int = 0, requires_grad: bool = True) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    z1, z2, z3 = (torch.randn(n, C, generator=g).mul(3).requires_grad_(requires_grad) for _ in range(3))
    y1 = torch.randint(0, C, (n,), generator=g)
    y3 = (y1 + 1 + torch.randint(0, C - 1, (n,), generator=g)) % C
    return z1, y1, z2, y1.clone(), z3, y3


def _casd(**kw: object) -> CASDLoss:
    kw.setdefault("alpha_mode", "fixed")
    kw.setdefault("label_smoothing", 0.0)  # the hand computations below use plain CE
    loss = build_loss(LossConfig(method="casd", **kw), C)  # type: ignore[arg-type]
    assert isinstance(loss, CASDLoss)
    return loss


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "triplet"},
        {"distance": "cosine"},
        {"alpha_mode": "magic"},
        {"temperature": 0.0},
        {"distill_weight": -1.0},
        {"label_smoothing": 1.0},
        {"alpha_target_active": 1.5},
        {"alpha_min": 1.0, "alpha_max": 1.0},
        {"alpha_mode": "learnable", "alpha_init": 0.0},  # on the bound: sigmoid cannot start there
        {"alpha_mode": "adaptive", "alpha_init": 3.0},
        {"alpha_mode": "fixed", "alpha_init": -0.1},
    ],
)
def test_config_rejects_bad_values_with_one_sentence(bad: dict[str, object]) -> None:
    with pytest.raises(CasdError) as err:
        LossConfig(**bad)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_fixed_alpha_may_exceed_learnable_bounds() -> None:
    # A fixed-α grid should not trip over bounds that only the learned schemes use.
    assert _casd(alpha_init=3.0).alpha == pytest.approx(3.0)


def test_build_loss_classes_and_partner_requirements() -> None:
    ce = build_loss(LossConfig(method="ce"), C)
    cskd = build_loss(LossConfig(method="cskd", partner_ce=False), C)
    casd = build_loss(LossConfig(method="casd"), C)
    assert isinstance(ce, CrossEntropyLoss) and isinstance(cskd, CSKDLoss) and isinstance(casd, CASDLoss)
    assert (ce.needs_positive, ce.needs_negative) == (False, False)
    assert (cskd.needs_positive, cskd.needs_negative) == (True, False)
    assert (casd.needs_positive, casd.needs_negative) == (True, True)


def test_distances_zero_on_equal_and_js_symmetric_and_bounded() -> None:
    z1, _, z2, _, _, _ = _batch(requires_grad=False)
    for kind in ("kl", "js"):
        assert torch.equal(distribution_distance(z1, z1, T, kind), torch.zeros(len(z1)))
    js = distribution_distance(z1 * 50, z2 * 50, 1.0, "js")
    assert torch.allclose(js, distribution_distance(z2 * 50, z1 * 50, 1.0, "js"), atol=1e-6)
    assert bool((js <= math.log(2) + 1e-6).all()) and bool((js > 0).all())
    kl = distribution_distance(z2, z1, T, "kl")
    expected = F.kl_div(F.log_softmax(z1 / T, -1), F.softmax(z2 / T, -1), reduction="none").sum(-1)
    assert torch.allclose(kl, expected, atol=1e-6)


def test_ce_ignores_partners() -> None:
    z1, y1, z2, y2, z3, y3 = _batch()
    loss = build_loss(LossConfig(method="ce", label_smoothing=0.1), C)
    out = loss(z1, y1, z2, y2, z3, y3)
    assert isinstance(out, LossOutput)
    assert torch.allclose(out.total, F.cross_entropy(z1, y1, label_smoothing=0.1))
    assert torch.equal(loss(z1, y1).total, out.total)
    out.total.backward()
    assert z2.grad is None and z3.grad is None
    assert set(out.terms) == {"ce", "total"} and all(isinstance(v, float) for v in out.terms.values())
    assert list(loss.parameters()) == []


@pytest.mark.parametrize("partner_ce", [False, True])
def test_cskd_equals_hand_computation_with_detached_partner(partner_ce: bool) -> None:
    z1, y1, z2, y2, _, _ = _batch()
    lam = 2.0
    loss = build_loss(LossConfig(method="cskd", temperature=T, distill_weight=lam, partner_ce=partner_ce,
                                 label_smoothing=0.0), C)
    out = loss(z1, y1, z2, y2)

    kl = F.kl_div(F.log_softmax(z1 / T, dim=1), F.softmax(z2.detach() / T, dim=1), reduction="batchmean")
    ce = F.cross_entropy(z1, y1)
    if partner_ce:
        ce = (ce + F.cross_entropy(z2, y2)) / 2
    expected = ce + lam * T**2 * kl
    assert torch.allclose(out.total, expected, atol=1e-5)
    assert out.terms["pull"] == pytest.approx(T**2 * kl.item(), rel=1e-5)

    out.total.backward()
    if partner_ce:
        # The partner receives exactly its own CE gradient, nothing from the distillation.
        g2 = torch.autograd.grad(F.cross_entropy(z2, y2) / 2, z2)[0]
        assert torch.allclose(z2.grad, g2, atol=1e-7)
    else:
        assert z2.grad is None


def test_pull_term_exactly_zero_when_anchor_and_positive_match() -> None:
    z1, y1, _, y2, z3, y3 = _batch()
    out = _casd()(z1, y1, z1.detach().clone(), y2, z3, y3)
    assert out.terms["pull"] == 0.0 and out.terms["d_pos"] == 0.0


def _margin_case(alpha: float) -> dict[str, float]:
    """One triplet with d(p2, p1) = 0 and a known d(p3, p1); margin active iff α > d_neg."""
    z1 = torch.tensor([[2.0, 0.0, -1.0] + [0.0] * (C - 3)])
    z3 = torch.tensor([[0.0, 2.5, 0.5] + [0.0] * (C - 3)])
    y = torch.tensor([0])
    return _casd(alpha_init=alpha, temperature=T)(z1, y, z1.clone(), y, z3, torch.tensor([1])).terms


def test_margin_active_exactly_when_hinge_positive() -> None:
    z1 = torch.tensor([[2.0, 0.0, -1.0] + [0.0] * (C - 3)])
    z3 = torch.tensor([[0.0, 2.5, 0.5] + [0.0] * (C - 3)])
    d_neg = distribution_distance(z3, z1, T, "kl").item()
    assert d_neg > 0.01

    above = _margin_case(d_neg + 1e-3)  # d_pos − d_neg + α = +1e-3
    assert above["active_fraction"] == 1.0
    assert above["margin"] == pytest.approx(T**2 * 1e-3, rel=1e-2)

    below = _margin_case(d_neg - 1e-3)  # −1e-3: satisfied, no loss
    assert below["active_fraction"] == 0.0 and below["margin"] == 0.0
    assert below["d_neg"] == pytest.approx(d_neg)


def test_active_fraction_counts_violated_triplets() -> None:
    z1, y1, _, y2, _, y3 = _batch(n=4, requires_grad=False)
    z3 = z1.clone()
    z3[:2] = -20 * z1[:2]  # far negatives: margin satisfied; the other two equal the anchor
    out = _casd(alpha_init=0.2)(z1, y1, z1.clone(), y2, z3, y3)
    assert out.terms["active_fraction"] == 0.5
    assert out.terms["margin"] == pytest.approx(T**2 * 0.2 * 2 / 4, rel=1e-5)


@pytest.mark.parametrize("mode", ["fixed", "learnable", "adaptive"])
@pytest.mark.parametrize("distance", ["kl", "js"])
def test_total_is_sum_of_weighted_terms(mode: str, distance: str) -> None:
    z1, y1, z2, y2, z3, y3 = _batch()
    lam = 2.5
    out = _casd(alpha_mode=mode, distance=distance, distill_weight=lam, alpha_init=0.05)(z1, y1, z2, y2, z3, y3)
    t = out.terms
    assert t["total"] == pytest.approx(out.total.item())
    assert t["total"] == pytest.approx(t["ce"] + lam * t["casd"], rel=1e-6)
    assert t["casd"] == pytest.approx(t["pull"] + t["margin"], rel=1e-6)
    assert t["pull"] == pytest.approx(T**2 * t["d_pos"], rel=1e-6)
    assert t["ce"] == pytest.approx(
        ((F.cross_entropy(z1, y1) + F.cross_entropy(z2, y2) + F.cross_entropy(z3, y3)) / 3).item(), rel=1e-6
    )
    assert set(t) == {"ce", "ce_anchor", "pull", "margin", "casd", "alpha", "active_fraction", "d_pos", "d_neg", "total"}
    assert all(type(v) is float for v in t.values())


def test_fixed_alpha_has_no_trainable_parameters() -> None:
    loss = _casd(alpha_mode="fixed", alpha_init=0.7)
    assert [p for p in loss.parameters() if p.requires_grad] == []
    assert loss.alpha == pytest.approx(0.7)
    z1, y1, z2, y2, z3, y3 = _batch()
    loss(z1, y1, z2, y2, z3, y3).total.backward()
    assert loss.alpha == pytest.approx(0.7)
    assert "alpha_value" in loss.state_dict()  # still saved with checkpoints


@pytest.mark.parametrize("mode", ["learnable", "adaptive"])
def test_learned_alpha_is_a_bounded_parameter_starting_at_init(mode: str) -> None:
    loss = _casd(alpha_mode=mode, alpha_init=0.5, alpha_min=0.1, alpha_max=2.0)
    params = list(loss.parameters())
    assert len(params) == 1 and params[0].requires_grad
    assert loss.alpha == pytest.approx(0.5, rel=1e-6)
    with torch.no_grad():
        params[0].fill_(1e3)
    assert loss.alpha == pytest.approx(2.0)
    with torch.no_grad():
        params[0].fill_(-1e3)
    assert loss.alpha == pytest.approx(0.1)


def _alpha_step(mode: str, z3_far: bool, target: float = 0.1) -> tuple[float, float, float]:
    """(gradient on α's logit, α before, α after one SGD step) for all-active or none-active triplets."""
    z1, y1, _, y2, z3, y3 = _batch(requires_grad=False)
    z2 = z1 + 0.1 * torch.randn_like(z1)
    z3 = -20 * z1 if z3_far else z1.clone()  # far: all margins satisfied; equal: all violated
    loss = _casd(alpha_mode=mode, alpha_init=0.5, alpha_target_active=target)
    before = loss.alpha
    out = loss(z1, y1, z2, y2, z3, y3)
    assert out.terms["active_fraction"] == (0.0 if z3_far else 1.0)
    out.total.backward()
    grad = loss.alpha_logit.grad.item()
    with torch.no_grad():  # one plain SGD step (torch.optim's first import costs seconds)
        loss.alpha_logit -= 0.5 * loss.alpha_logit.grad
    return grad, before, loss.alpha


def test_learnable_alpha_is_pushed_down_by_the_loss_alone() -> None:
    grad, before, after = _alpha_step("learnable", z3_far=False)
    assert grad > 0 and after < before
    grad, before, after = _alpha_step("learnable", z3_far=True)
    assert grad == 0.0 and after == before  # no violated margin, nothing to push on


def test_adaptive_alpha_follows_active_fraction_against_target() -> None:
    grad, before, after = _alpha_step("adaptive", z3_far=False, target=0.1)  # 100 % active > 10 %
    assert grad > 0 and after < before
    grad, before, after = _alpha_step("adaptive", z3_far=True, target=0.1)  # 0 % active < 10 %
    assert grad < 0 and after > before


def test_adaptive_objective_reaches_alpha_only() -> None:
    z1, y1, z2, y2, z3, y3 = _batch()
    adaptive = _casd(alpha_mode="adaptive", alpha_init=0.05)
    out_a = adaptive(z1, y1, z2, y2, z3, y3)
    grads_a = torch.autograd.grad(out_a.total, [z1, z2, z3])

    fixed = _casd(alpha_mode="fixed", alpha_init=adaptive.alpha)
    out_f = fixed(z1, y1, z2, y2, z3, y3)
    grads_f = torch.autograd.grad(out_f.total, [z1, z2, z3])

    assert 0 < out_a.terms["active_fraction"] < 1
    assert out_a.total.item() == pytest.approx(out_f.total.item(), rel=1e-6)
    for ga, gf in zip(grads_a, grads_f):
        assert torch.allclose(ga, gf, atol=1e-7)


def test_detached_partners_get_no_distillation_gradient() -> None:
    z1, y1, z2, y2, z3, y3 = _batch()
    _casd(partner_ce=False, detach_partner=True, alpha_init=0.05)(z1, y1, z2, y2, z3, y3).total.backward()
    assert z1.grad is not None and z1.grad.abs().sum() > 0
    assert z2.grad is None and z3.grad is None

    z1, y1, z2, y2, z3, y3 = _batch()
    out = _casd(partner_ce=True, detach_partner=True, alpha_init=0.05)(z1, y1, z2, y2, z3, y3)
    out.total.backward()
    # Only their own CE (a third of the averaged CE) reaches the partners.
    assert torch.allclose(z2.grad, torch.autograd.grad(F.cross_entropy(z2, y2) / 3, z2)[0], atol=1e-7)
    assert torch.allclose(z3.grad, torch.autograd.grad(F.cross_entropy(z3, y3) / 3, z3)[0], atol=1e-7)

    z1, y1, z2, y2, z3, y3 = _batch()
    out = _casd(partner_ce=False, detach_partner=False, alpha_init=0.05)(z1, y1, z2, y2, z3, y3)
    assert 0 < out.terms["active_fraction"]
    out.total.backward()
    assert z2.grad.abs().sum() > 0 and z3.grad.abs().sum() > 0


def test_missing_partner_or_wrong_class_count_is_a_clear_error() -> None:
    z1, y1, z2, y2, _, _ = _batch()
    with pytest.raises(CasdError, match="negative"):
        _casd()(z1, y1, z2, y2)
    with pytest.raises(CasdError, match="positive"):
        build_loss(LossConfig(method="cskd"), C)(z1, y1)
    with pytest.raises(CasdError, match="number of classes"):
        build_loss(LossConfig(method="ce"), C + 1)(z1, y1)


def test_label_smoothing_applies_to_every_branch() -> None:
    z1, y1, z2, y2, z3, y3 = _batch()
    out = _casd(label_smoothing=0.1)(z1, y1, z2, y2, z3, y3)
    expected = sum(F.cross_entropy(z, y, label_smoothing=0.1) for z, y in [(z1, y1), (z2, y2), (z3, y3)]) / 3
    assert out.terms["ce"] == pytest.approx(expected.item(), rel=1e-6)


# -- the distillation-weight schedule (issue 14) ------------------------------------------------

@pytest.mark.parametrize(("progress", "expected"), [(0.0, 2.0), (0.25, 1.0 + math.sqrt(0.5)), (0.5, 1.0),
                                                    (0.75, 1.0 - math.sqrt(0.5)), (1.0, 0.0),
                                                    (-0.5, 2.0), (1.5, 0.0)])
def test_cosine_schedule_decays_lambda_over_the_steps_done(progress: float, expected: float) -> None:
    from casd_core.losses import distill_weight_at

    cosine = LossConfig(method="casd", distill_weight=2.0, distill_schedule="cosine")
    assert distill_weight_at(cosine, progress) == pytest.approx(expected, abs=1e-12)
    assert distill_weight_at(LossConfig(method="casd", distill_weight=2.0), progress) == 2.0


@pytest.mark.parametrize("method", ["cskd", "casd"])
def test_scheduled_loss_weighs_the_distillation_with_lambda_t(method: str) -> None:
    z1, y1, z2, y2, z3, y3 = _batch()
    lam, progress = 1.5, 0.3
    expected_weight = lam * 0.5 * (1 + math.cos(math.pi * progress))
    loss = build_loss(LossConfig(method=method, distill_weight=lam, distill_schedule="cosine",
                                 alpha_mode="fixed"), C)
    out = loss(z1, y1, z2, y2, z3, y3, progress=progress)
    t = out.terms
    distill = t["casd"] if method == "casd" else t["pull"]
    assert t["distill_weight"] == pytest.approx(expected_weight, rel=1e-12)
    assert out.total.item() == pytest.approx(t["ce"] + expected_weight * distill, rel=1e-6)
    # at the start it is the constant-λ loss (which ignores progress); at the end only CE is left
    constant = build_loss(LossConfig(method=method, distill_weight=lam, alpha_mode="fixed"), C)
    unscheduled = constant(z1, y1, z2, y2, z3, y3, progress=progress)
    assert "distill_weight" not in unscheduled.terms  # a constant λ is in the recorded config
    assert unscheduled.total.item() == pytest.approx(t["ce"] + lam * distill, rel=1e-6)
    assert loss(z1, y1, z2, y2, z3, y3, progress=0.0).total.item() == pytest.approx(unscheduled.total.item(),
                                                                                    rel=1e-6)
    assert loss(z1, y1, z2, y2, z3, y3, progress=1.0).total.item() == pytest.approx(t["ce"], rel=1e-6)


def test_unknown_distill_schedule_is_refused_by_name() -> None:
    with pytest.raises(CasdError, match="distill_schedule.*constant, cosine"):
        LossConfig(method="casd", distill_schedule="linear")
