"""Preference losses against hand-worked numbers, an independent DPO, autograd, and properties.

Shared worked example unless a test says otherwise (one pair):
    lp_w = -10, lp_l = -12, ref_w = -11, ref_l = -11
    so the log-ratios are r_w = lp_w - ref_w = 1 and r_l = lp_l - ref_l = -1, h = r_w - r_l = 2.
softplus(x) = ln(1 + e^x) and -logsigmoid(z) = softplus(-z).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hdpo_ds.objectives.losses import LOSS_TYPES, preference_loss


def _pair(dtype=torch.float64):
    t = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
    return t(-10.0), t(-12.0), t(-11.0), t(-11.0)


def _check(out, loss, chosen_reward, rejected_reward):
    torch.testing.assert_close(out.losses, torch.tensor([loss], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        out.chosen_rewards, torch.tensor([chosen_reward], dtype=torch.float64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        out.rejected_rewards, torch.tensor([rejected_reward], dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_hdpo_worked_example():
    """beta=0.1, alpha=0.9:
    chosen reward   = 0.9*0.1*(-10) - 0.1*(-11) = -0.9 + 1.1 = 0.2
    rejected reward = 0.9*0.1*(-12) - 0.1*(-11) = -1.08 + 1.1 = 0.02
    z = 0.2 - 0.02 = 0.18;  loss = softplus(-0.18) = ln(1 + e^-0.18) = ln(1.8352702) = 0.6071917248
    """
    out = preference_loss(*_pair(), loss_type="hdpo", beta=0.1, alpha=0.9)
    _check(out, 0.6071917248407819, 0.2, 0.02)


def test_hdpo_label_smoothing_worked_example():
    """eps=0.1 at z=0.18: 0.9*softplus(-z) + 0.1*softplus(z) = softplus(-z) + 0.1*z
    (softplus(z) - softplus(-z) = z) = 0.6071917248 + 0.018 = 0.6251917248."""
    out = preference_loss(*_pair(), loss_type="hdpo", beta=0.1, alpha=0.9, label_smoothing=0.1)
    _check(out, 0.6251917248407819, 0.2, 0.02)


def test_ipo_worked_example():
    """beta=0.5: 1/(2*beta) = 1; loss = (h - 1)^2 = (2 - 1)^2 = 1; rewards 0.5*1 and 0.5*(-1)."""
    out = preference_loss(*_pair(), loss_type="ipo", beta=0.5)
    _check(out, 1.0, 0.5, -0.5)


@pytest.mark.parametrize(("beta", "loss"), [(0.1, 0.8), (1.0, 0.0)])
def test_hinge_worked_example(beta, loss):
    """loss = max(0, 1 - beta*h): beta=0.1 -> 1 - 0.2 = 0.8; beta=1 -> max(0, 1 - 2) = 0."""
    out = preference_loss(*_pair(), loss_type="hinge", beta=beta)
    _check(out, loss, beta * 1.0, beta * -1.0)


def test_fdpo_forward_kl_worked_example():
    """g(r) = -e^-r: g_w = -e^-1 = -0.3678794, g_l = -e^1 = -2.7182818;
    z = 0.1*(g_w - g_l) = 0.1*2.3504024 = 0.2350402; loss = softplus(-z) = 0.5825167134."""
    out = preference_loss(*_pair(), loss_type="fdpo_forward_kl", beta=0.1)
    _check(out, 0.5825167134595296, 0.1, -0.1)


def test_fdpo_js_worked_example():
    """g(r) = ln 2 - softplus(-r): g_w - g_l = softplus(1) - softplus(-1) = 1 exactly;
    z = 0.1; loss = softplus(-0.1) = ln(1 + e^-0.1) = 0.6443966601."""
    out = preference_loss(*_pair(), loss_type="fdpo_js", beta=0.1)
    _check(out, 0.6443966600735709, 0.1, -0.1)


def test_fdpo_alpha_worked_example():
    """f_alpha=0.5: g(r) = 2*(1 - e^(-r/2)): g_w = 2*(1 - 0.6065307) = 0.7869387,
    g_l = 2*(1 - 1.6487213) = -1.2974425; z = 0.1*2.0843812 = 0.2084381; loss = 0.5943491230."""
    out = preference_loss(*_pair(), loss_type="fdpo_alpha", beta=0.1, f_alpha=0.5)
    _check(out, 0.5943491229720279, 0.1, -0.1)


def test_nll_regulariser_worked_example():
    """nll_weight=0.5, 4 chosen tokens: + 0.5 * (-(-10) / 4) = +1.25 on top of the H-DPO loss."""
    out = preference_loss(
        *_pair(),
        loss_type="hdpo",
        beta=0.1,
        alpha=0.9,
        nll_weight=0.5,
        chosen_token_counts=torch.tensor([4]),
    )
    _check(out, 0.6071917248407819 + 1.25, 0.2, 0.02)


def _needed(loss_type, n):
    """What a loss type cannot run without: EXO's eps, and both token counts for sigmoid_norm."""
    if loss_type == "exo_pair":
        return {"label_smoothing": 1e-3}
    if loss_type == "sigmoid_norm":
        counts = torch.arange(1, n + 1)
        return {"chosen_token_counts": counts, "rejected_token_counts": counts.flip(0)}
    return {}


def _random_logps(n=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=dtype) * 50) for _ in range(4)]


@pytest.mark.parametrize("alias", ["hdpo", "dpo", "sigmoid"])
def test_alpha_one_equals_independent_dpo(alias):
    """DPO as Rafailov et al. write it: -logsigmoid(beta*((lp_w - ref_w) - (lp_l - ref_l)))."""
    beta = 0.3
    for dtype, tolerance in (
        (torch.float64, {"rtol": 0, "atol": 1e-6}),
        (torch.float32, {"rtol": 1e-6, "atol": 1e-6}),
    ):
        lp_w, lp_l, ref_w, ref_l = _random_logps(dtype=dtype)
        dpo = -F.logsigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l)))
        out = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type=alias, beta=beta, alpha=1.0)
        torch.testing.assert_close(out.losses, dpo, **tolerance)


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.95, 1.1, 2.0])
def test_hdpo_gradient_is_alpha_times_dpo_gradient(alpha):
    """z is the same when DPO sees alpha*lp; then dL_hdpo/dlp_w = alpha * dL_dpo/d(alpha*lp_w)."""
    lp_w, lp_l, ref_w, ref_l = _random_logps(seed=1)
    beta = 0.2
    lp_w_h, lp_l_h = lp_w.clone().requires_grad_(), lp_l.clone().requires_grad_()
    preference_loss(lp_w_h, lp_l_h, ref_w, ref_l, beta=beta, alpha=alpha).losses.sum().backward()
    scaled_w, scaled_l = (alpha * lp_w).requires_grad_(), (alpha * lp_l).requires_grad_()
    preference_loss(scaled_w, scaled_l, ref_w, ref_l, loss_type="dpo", beta=beta).losses.sum().backward()
    torch.testing.assert_close(lp_w_h.grad, alpha * scaled_w.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(lp_l_h.grad, alpha * scaled_l.grad, rtol=1e-12, atol=1e-15)
    # and not the plain DPO gradient: the test would catch alpha being dropped from the chain rule
    assert not torch.allclose(lp_w_h.grad, scaled_w.grad)


def test_rewards_are_detached_and_losses_carry_gradient():
    lp_w, lp_l, ref_w, ref_l = (t.requires_grad_() for t in _random_logps(n=3))
    for loss_type in LOSS_TYPES:
        out = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type=loss_type, **_needed(loss_type, 3))
        assert out.losses.requires_grad
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
        (grad_ref,) = torch.autograd.grad(out.losses.sum(), ref_w, allow_unused=True)
        assert grad_ref is None, f"{loss_type}: the reference must be a constant"


@pytest.mark.parametrize("loss_type", ["fdpo_forward_kl", "fdpo_js", "fdpo_alpha"])
@pytest.mark.parametrize("magnitude", [50.0, 100.0, 200.0])
def test_fdpo_finite_for_large_log_ratios(loss_type, magnitude):
    """|lp - ref| up to 200 in float32: exp(200) alone would overflow (float32 max ~ 3.4e38)."""
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    lp_w = (signs * magnitude).requires_grad_()
    lp_l = (-signs * magnitude).requires_grad_()
    zeros = torch.zeros(4)
    out = preference_loss(lp_w, lp_l, zeros, zeros, loss_type=loss_type, beta=0.1)
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    assert torch.isfinite(lp_w.grad).all() and torch.isfinite(lp_l.grad).all()
    # chosen far below rejected must still be pushed up: the cap keeps that gradient from vanishing
    assert (lp_w.grad[signs < 0] < 0).all(), lp_w.grad


def test_fdpo_capped_exp_is_continuous_at_the_cap():
    from hdpo_ds.objectives.losses import FDPO_MAX_EXPONENT, _capped_exp

    x = torch.tensor(
        [FDPO_MAX_EXPONENT - 1e-6, FDPO_MAX_EXPONENT, FDPO_MAX_EXPONENT + 1e-6], dtype=torch.float64
    )
    y = _capped_exp(x)
    torch.testing.assert_close(
        y, torch.exp(torch.tensor(FDPO_MAX_EXPONENT, dtype=torch.float64)).expand(3), rtol=2e-6, atol=0
    )


@pytest.mark.parametrize("past", [1e-3, 1.0, 10.0, 60.0])
def test_fdpo_capped_exp_continues_with_the_slope_at_the_cap(past):
    """Past the cap c the docstring promises the tangent line: value e^c * (1 + (x - c)), slope e^c
    (a hard clamp would give slope 0); below it exp itself, value and slope e^x."""
    from hdpo_ds.objectives.losses import FDPO_MAX_EXPONENT as CAP
    from hdpo_ds.objectives.losses import _capped_exp

    x = torch.tensor([CAP + past], dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(_capped_exp(x).sum(), x)
    assert slope.item() == pytest.approx(math.exp(CAP), rel=1e-12)
    assert _capped_exp(x).item() == pytest.approx(math.exp(CAP) * (1 + past), rel=1e-12)
    below = torch.tensor([CAP - past], dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(_capped_exp(below).sum(), below)
    assert slope.item() == pytest.approx(math.exp(CAP - past), rel=1e-12)


def test_fdpo_alpha_gradient_past_the_cap_by_hand():
    """fdpo_alpha, f_alpha=0.5, beta=0.1, chosen log-ratio r_w = -100 (exponent -f_alpha*r_w = 50, past the
    cap c = 40), r_l = 0. g(r) = (1 - capped_exp(-a*r)) / a, so past the cap dg/dr = e^c (the cap's slope
    times a / a); z = beta*(g(r_w) - g(r_l)) with g(0) = 0, and dL/dlp_w = -sigmoid(-z) * beta * e^c."""
    from hdpo_ds.objectives.losses import FDPO_MAX_EXPONENT as CAP

    a, beta = 0.5, 0.1
    lp_w = torch.tensor([-100.0], dtype=torch.float64, requires_grad=True)
    lp_l = torch.tensor([-7.0], dtype=torch.float64, requires_grad=True)
    ref_w, ref_l = torch.tensor([0.0], dtype=torch.float64), torch.tensor([-7.0], dtype=torch.float64)
    out = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type="fdpo_alpha", beta=beta, f_alpha=a)
    g_w = (1 - math.exp(CAP) * (1 + (50.0 - CAP))) / a  # the tangent line at the cap, 10 past it
    z = beta * g_w
    sigmoid_neg_z = 1 / (1 + math.exp(z))  # z ~ -5.3e16: sigmoid(-z) = 1 to double precision
    assert out.losses.item() == pytest.approx(-z, rel=1e-12)  # softplus(-z) = -z for z this negative
    grad_w, grad_l = torch.autograd.grad(out.losses.sum(), [lp_w, lp_l])
    assert grad_w.item() == pytest.approx(-sigmoid_neg_z * beta * math.exp(CAP), rel=1e-12)
    # g'(0) = 1 (exp's own slope below the cap): dL/dlp_l = +sigmoid(-z) * beta
    assert grad_l.item() == pytest.approx(sigmoid_neg_z * beta * 1.0, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"alpha": 0.0}, "alpha"),
        ({"f_alpha": 0.0}, "f_alpha"),
        ({"f_alpha": 1.0}, "f_alpha"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"nll_weight": -1.0}, "nll_weight"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
        ({"loss_type": "dpo", "alpha": 0.9}, "alpha"),
        ({"nll_weight": 0.1}, "chosen_token_counts"),
    ],
)
def test_invalid_hyperparameters_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        preference_loss(*_pair(), **kwargs)


def test_unknown_loss_type_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown loss_type 'kto'") as info:
        preference_loss(*_pair(), loss_type="kto")
    for name in (*LOSS_TYPES, "dpo", "sigmoid"):
        assert name in str(info.value)


def test_mismatched_shapes_are_rejected():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="same shape"):
        preference_loss(a, a, a, torch.zeros(4))


def test_bf16_inputs_compute_in_float32():
    lp_w, lp_l, ref_w, ref_l = (t.to(torch.bfloat16) for t in _random_logps(n=8))
    out = preference_loss(lp_w, lp_l, ref_w, ref_l, alpha=0.9)
    assert out.losses.dtype == torch.float32
    expected = preference_loss(*(t.float() for t in (lp_w, lp_l, ref_w, ref_l)), alpha=0.9)
    torch.testing.assert_close(out.losses, expected.losses, rtol=0, atol=0)


_logp = st.floats(min_value=-500, max_value=0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.tuples(_logp, _logp, _logp, _logp), min_size=1, max_size=16),
    loss_type=st.sampled_from(LOSS_TYPES),
    beta=st.floats(min_value=0.01, max_value=5.0),
)
def test_property_shapes_and_finiteness(values, loss_type, beta):
    cols = [torch.tensor(c, dtype=torch.float32, requires_grad=True) for c in zip(*values, strict=True)]
    n = len(values)
    out = preference_loss(*cols, loss_type=loss_type, beta=beta, **_needed(loss_type, n))
    for t in out:
        assert t.shape == (n,)
        assert torch.isfinite(t).all()
    out.losses.sum().backward()
    assert torch.isfinite(cols[0].grad).all() and torch.isfinite(cols[1].grad).all()


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.tuples(_logp, _logp, _logp, _logp), min_size=1, max_size=8),
    alpha=st.floats(min_value=0.1, max_value=3.0),
    beta=st.floats(min_value=0.01, max_value=1.0),
    eps=st.floats(min_value=0.0, max_value=0.49),
)
def test_property_hdpo_antisymmetry(values, alpha, beta, eps):
    """Swapping chosen and rejected maps z to -z; loss(z) - loss(-z) = -(1 - 2*eps) * z."""
    lp_w, lp_l, ref_w, ref_l = (torch.tensor(c, dtype=torch.float64) for c in zip(*values, strict=True))
    kw = {"beta": beta, "alpha": alpha, "label_smoothing": eps}
    forward = preference_loss(lp_w, lp_l, ref_w, ref_l, **kw)
    swapped = preference_loss(lp_l, lp_w, ref_l, ref_w, **kw)
    z = forward.chosen_rewards - forward.rejected_rewards
    torch.testing.assert_close(forward.losses - swapped.losses, -(1 - 2 * eps) * z, rtol=1e-9, atol=1e-9)


def test_dpo_loss_at_zero_margin_is_log_two():
    zeros = torch.zeros(5)
    out = preference_loss(zeros, zeros, zeros, zeros)
    torch.testing.assert_close(out.losses, torch.full((5,), math.log(2.0)))
