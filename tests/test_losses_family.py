"""The sequence-level losses from the literature beyond H-DPO (robust, exo_pair, nca_pair, sppo_hard,
apo_zero, apo_down, discopop, sigmoid_norm, dpop): hand-worked numbers, float64 gradient checks, finiteness at
log-ratios of +-200 in float32, and the limit identities each one has.

Shared worked example unless a test says otherwise (one pair), as in tests/test_losses.py:
    lp_w = -10, lp_l = -12, ref_w = -11, ref_l = -11
    so the log-ratios are r_w = 1, r_l = -1 and h = r_w - r_l = 2.
softplus(x) = ln(1 + e^x), -logsigmoid(z) = softplus(-z), softplus(z) - softplus(-z) = z,
sigmoid(1) = 0.7310585786, sigmoid(2) = 0.8807970780, softplus(1) = 1.3132616875,
softplus(-1) = 0.3132616875, softplus(-0.2) = 0.5981388694.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hdpo_ds.config import load_config
from hdpo_ds.objectives.losses import (
    EXO_DEFAULT_EPSILON,
    LOSS_TYPES,
    TDPO_LOSS_TYPES,
    alpha_does_not_apply,
    preference_loss,
)
from hdpo_ds.objectives.objective import PairTerms, make_objective

NEW_TYPES = (
    "robust",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "dpop",
)


def _pair(dtype=torch.float64):
    t = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
    return t(-10.0), t(-12.0), t(-11.0), t(-11.0)


def _check(out, loss, chosen_reward, rejected_reward, atol=1e-10):
    for got, want in zip(out, (loss, chosen_reward, rejected_reward), strict=True):
        torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float64), rtol=0, atol=atol)


def _counts(n_w, n_l):
    return {"chosen_token_counts": torch.tensor([n_w]), "rejected_token_counts": torch.tensor([n_l])}


# ---------------------------------------------------------------- hand-worked numbers


def test_robust_worked_example():
    """beta=0.1, alpha=0.9, eps=0.1: z = 0.9*0.1*(-10 + 12) - 0.1*(-11 + 11) = 0.18 (H-DPO's logit,
    rewards 0.2 and 0.02 as in the H-DPO example). loss = (0.9*softplus(-z) - 0.1*softplus(z)) / 0.8, and
    softplus(z) = softplus(-z) + z, so loss = softplus(-z) - 0.1*z/0.8 = 0.6071917248 - 0.0225
    = 0.5846917248."""
    out = preference_loss(*_pair(), loss_type="robust", beta=0.1, alpha=0.9, label_smoothing=0.1)
    _check(out, 0.6071917248407819 - 0.0225, 0.2, 0.02)


def test_dpop_worked_example():
    """The chosen response below its reference: lp_w = -12, lp_l = -14, ref_w = ref_l = -11, beta = 0.1,
    lambda = 5. alpha 1: z = 0.1*(-12 + 14) - 0.1*0 = 0.2, penalty 0.1*5*max(0, -11 + 12) = 0.5, loss =
    softplus(0.5 - 0.2) = softplus(0.3) = 0.8543552444; alpha 0.9: z = 0.9*0.1*2 = 0.18, loss = softplus(0.32)
    = 0.8658929372. Rewards alpha*beta*lp - beta*ref: -0.1 and -0.3 (alpha 1), 0.02 and -0.16 (alpha 0.9).
    Above the reference (the shared example, r_w = 1) the penalty is 0 and DPOP is H-DPO."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    below = (t(-12.0), t(-14.0), t(-11.0), t(-11.0))
    out = preference_loss(*below, loss_type="dpop", beta=0.1, dpop_lambda=5.0)
    _check(out, 0.8543552444, -0.1, -0.3)
    out = preference_loss(*below, loss_type="dpop", beta=0.1, alpha=0.9, dpop_lambda=5.0)
    _check(out, 0.8658929372, 0.02, -0.16)
    for alpha in (1.0, 0.9):
        dpop = preference_loss(*_pair(), loss_type="dpop", beta=0.1, alpha=alpha, dpop_lambda=5.0)
        hdpo = preference_loss(*_pair(), loss_type="hdpo", beta=0.1, alpha=alpha)
        for got, want in zip(dpop, hdpo, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # lambda = 0 is H-DPO below the reference too
    zero = preference_loss(*below, loss_type="dpop", beta=0.1, alpha=0.9, dpop_lambda=0.0)
    torch.testing.assert_close(zero.losses, preference_loss(*below, beta=0.1, alpha=0.9).losses)


def test_exo_pair_worked_example():
    """beta=0.5, eps=0.1: z = 0.5*2 = 1. loss = sigmoid(1)*(logsigmoid(1) - ln 0.9)
    + sigmoid(-1)*(logsigmoid(-1) - ln 0.1)
    = 0.7310585786*(-0.3132616875 + 0.1053605157) + 0.2689414214*(-1.3132616875 + 2.3025850930)
    = -0.1519879352 + 0.2660700429 = 0.1140821077; rewards 0.5*1 and 0.5*(-1)."""
    out = preference_loss(*_pair(), loss_type="exo_pair", beta=0.5, label_smoothing=0.1)
    _check(out, 0.1140821077, 0.5, -0.5)


def test_nca_pair_worked_example():
    """beta=1: u_w = 1, u_l = -1. loss = softplus(-u_w) + softplus(u_w)/2 + softplus(u_l)/2
    = 0.3132616875 + 1.3132616875/2 + 0.3132616875/2 = 1.1265233750."""
    out = preference_loss(*_pair(), loss_type="nca_pair", beta=1.0)
    _check(out, 1.1265233750, 1.0, -1.0)


@pytest.mark.parametrize(("beta", "loss"), [(0.25, 2.0), (0.5, 0.0)])
def test_sppo_hard_worked_example(beta, loss):
    """1/(2*beta) = 2 at beta=0.25: (1 - 2)^2 + (-1 + 2)^2 = 2; at beta=0.5 it is 1, the optimum
    r_w = 1, r_l = -1 exactly, loss 0."""
    out = preference_loss(*_pair(), loss_type="sppo_hard", beta=beta)
    _check(out, loss, beta * 1.0, beta * -1.0)


def test_apo_zero_worked_example():
    """beta=1: loss = (1 - sigmoid(1)) + sigmoid(-1) = 2*sigmoid(-1) = 2*0.2689414214 = 0.5378828427."""
    out = preference_loss(*_pair(), loss_type="apo_zero", beta=1.0)
    _check(out, 0.5378828427, 1.0, -1.0)


def test_apo_down_worked_example():
    """beta=1: loss = sigmoid(u_w) + 1 - sigmoid(u_w - u_l) = sigmoid(1) + 1 - sigmoid(2)
    = 0.7310585786 + 0.1192029220 = 0.8502615007."""
    out = preference_loss(*_pair(), loss_type="apo_down", beta=1.0)
    _check(out, 0.8502615007, 1.0, -1.0)


def test_discopop_worked_example():
    """beta=0.1, tau=0.05: z = 0.2, m = sigmoid(z/tau) = sigmoid(4) = 0.9820137900.
    loss = (1 - m)*softplus(-z) + m*e^-z = 0.0179862100*0.5981388694 + 0.9820137900*0.8187307531
    = 0.0107582513 + 0.8040048899 = 0.8147631411."""
    out = preference_loss(*_pair(), loss_type="discopop", beta=0.1, discopop_tau=0.05)
    _check(out, 0.8147631411, 0.1, -0.1)


@pytest.mark.parametrize(("eps", "loss"), [(0.0, 0.6733471672), (0.1, 0.6773471672)])
def test_sigmoid_norm_worked_example(eps, loss):
    """beta=0.1, alpha=0.9, 4 chosen and 2 rejected tokens:
    chosen reward   = (0.9*0.1*(-10) - 0.1*(-11)) / 4 = (-0.9 + 1.1) / 4 = 0.05
    rejected reward = (0.9*0.1*(-12) - 0.1*(-11)) / 2 = (-1.08 + 1.1) / 2 = 0.01
    z = 0.04; loss = softplus(-0.04) = ln(1 + e^-0.04) = 0.6733471672; with cDPO eps = 0.1,
    + eps*z = 0.004 (0.9*softplus(-z) + 0.1*softplus(z) = softplus(-z) + 0.1*z)."""
    out = preference_loss(
        *_pair(), loss_type="sigmoid_norm", beta=0.1, alpha=0.9, label_smoothing=eps, **_counts(4, 2)
    )
    _check(out, loss, 0.05, 0.01)


# ---------------------------------------------------------------- gradients and finiteness

KWARGS = {
    "robust": {"alpha": 0.9, "label_smoothing": 0.2},
    "exo_pair": {"label_smoothing": 1e-3},
    "nca_pair": {},
    "sppo_hard": {},
    "apo_zero": {},
    "apo_down": {},
    "discopop": {"discopop_tau": 0.05},
    "sigmoid_norm": {"alpha": 0.9, "label_smoothing": 0.1},
    "dpop": {"alpha": 0.9, "dpop_lambda": 5.0},
}


def _random(n=6, seed=0, dtype=torch.float64, scale=20.0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=dtype) * scale) for _ in range(4)]


def _length_kwargs(loss_type, n, seed=1):
    if loss_type != "sigmoid_norm":
        return {}
    g = torch.Generator().manual_seed(seed)
    return {
        "chosen_token_counts": torch.randint(1, 30, (n,), generator=g),
        "rejected_token_counts": torch.randint(1, 30, (n,), generator=g),
    }


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_gradcheck_float64(loss_type):
    """Analytic against finite-difference gradients in the policy log-probs, at random log-ratios."""
    lp_w, lp_l, ref_w, ref_l = _random()
    kw = {"loss_type": loss_type, "beta": 0.3, **KWARGS[loss_type], **_length_kwargs(loss_type, 6)}

    def losses(a, b):
        return preference_loss(a, b, ref_w, ref_l, **kw).losses

    assert torch.autograd.gradcheck(losses, (lp_w.requires_grad_(), lp_l.requires_grad_()))


@pytest.mark.parametrize("loss_type", NEW_TYPES)
@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("magnitude", [50.0, 200.0])
def test_finite_for_large_log_ratios_in_float32(loss_type, beta, magnitude):
    """Log-ratios of +-magnitude, both signs for each response, in float32: losses and gradients finite."""
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    lp_w = (signs * magnitude).requires_grad_()
    lp_l = (torch.tensor([1.0, 1.0, -1.0, -1.0]) * magnitude).requires_grad_()
    zeros = torch.zeros(4)
    kw = {**KWARGS[loss_type], **_length_kwargs(loss_type, 4)}
    out = preference_loss(lp_w, lp_l, zeros, zeros, loss_type=loss_type, beta=beta, **kw)
    assert out.losses.dtype == torch.float32
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    assert torch.isfinite(lp_w.grad).all() and torch.isfinite(lp_l.grad).all(), (lp_w.grad, lp_l.grad)


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_rewards_detached_and_reference_constant(loss_type):
    lp_w, lp_l, ref_w, ref_l = (t.requires_grad_() for t in _random(n=3))
    kw = {**KWARGS[loss_type], **_length_kwargs(loss_type, 3)}
    out = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type=loss_type, **kw)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    (grad_ref,) = torch.autograd.grad(out.losses.sum(), ref_w, allow_unused=True)
    assert grad_ref is None


# ---------------------------------------------------------------- limit identities


@pytest.mark.parametrize("alpha", [1.0, 0.9])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("n", [1, 7])
def test_sigmoid_norm_with_equal_lengths_is_hdpo_at_beta_over_n(alpha, eps, n):
    lp_w, lp_l, ref_w, ref_l = _random(n=16)
    counts = torch.full((16,), n)
    kw = {"alpha": alpha, "label_smoothing": eps}
    norm = preference_loss(
        lp_w,
        lp_l,
        ref_w,
        ref_l,
        loss_type="sigmoid_norm",
        beta=0.4,
        **kw,
        chosen_token_counts=counts,
        rejected_token_counts=counts,
    )
    hdpo = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type="hdpo", beta=0.4 / n, **kw)
    for got, want in zip(norm, hdpo, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sigmoid_norm_alpha_one_is_length_normalised_dpo():
    """Written out independently: -logsigmoid(beta*(r_w/n_w - r_l/n_l))."""
    lp_w, lp_l, ref_w, ref_l = _random(n=16)
    kw = _length_kwargs("sigmoid_norm", 16)
    n_w, n_l = kw["chosen_token_counts"].double(), kw["rejected_token_counts"].double()
    expected = -F.logsigmoid(0.3 * ((lp_w - ref_w) / n_w - (lp_l - ref_l) / n_l))
    out = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type="sigmoid_norm", beta=0.3, **kw)
    torch.testing.assert_close(out.losses, expected, rtol=1e-12, atol=1e-12)
    # and the lengths matter: summed log-ratios would give another loss
    assert not torch.allclose(out.losses, preference_loss(lp_w, lp_l, ref_w, ref_l, beta=0.3).losses)


def test_sigmoid_norm_counts_zero_read_as_one():
    """A response with no tokens divides by 1 (lp = 0 there), not by 0."""
    zero = torch.zeros(1, dtype=torch.float64)
    out = preference_loss(
        zero,
        torch.tensor([-3.0], dtype=torch.float64),
        zero,
        zero,
        loss_type="sigmoid_norm",
        beta=1.0,
        **_counts(0, 3),
    )
    # z = 0/1 - (-3)/3 = 1: loss softplus(-1) = 0.3132616875
    _check(out, 0.3132616875, 0.0, -1.0)


@pytest.mark.parametrize("alpha", [1.0, 0.8])
def test_robust_with_eps_zero_is_hdpo(alpha):
    lp_w, lp_l, ref_w, ref_l = _random(n=16)
    robust = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type="robust", beta=0.2, alpha=alpha)
    hdpo = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type="hdpo", beta=0.2, alpha=alpha)
    for got, want in zip(robust, hdpo, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_robust_alpha_one_is_the_papers_rdpo():
    """rDPO as Chowdhury et al. write it, with DPO's loss l(z) = -logsigmoid(z), z = beta*h:
    ((1 - eps)*l(z) - eps*l(-z)) / (1 - 2*eps)."""
    lp_w, lp_l, ref_w, ref_l = _random(n=16)
    eps, beta = 0.3, 0.2
    z = beta * ((lp_w - ref_w) - (lp_l - ref_l))
    expected = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    out = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type="robust", beta=beta, label_smoothing=eps)
    torch.testing.assert_close(out.losses, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.45])
def test_robust_is_unbiased_under_label_flips(eps):
    """The point of rDPO: a label flipped with probability eps swaps chosen and rejected (z -> -z), and the
    expected robust loss is the clean DPO loss: (1 - eps)*L(z) + eps*L(-z) = -logsigmoid(z)."""
    lp_w, lp_l, ref_w, ref_l = _random(n=16)
    kw = {"loss_type": "robust", "beta": 0.2, "label_smoothing": eps}
    kept = preference_loss(lp_w, lp_l, ref_w, ref_l, **kw).losses
    flipped = preference_loss(lp_l, lp_w, ref_l, ref_w, **kw).losses
    clean = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type="dpo", beta=0.2).losses
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["robust", "sigmoid_norm"])
@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.5])
def test_alpha_forms_are_their_alpha_one_forms_at_alpha_times_lp(loss_type, alpha):
    """alpha multiplies the policy's log-prob only: the loss at (lp, alpha) is the alpha=1 loss at alpha*lp,
    and the gradient in lp is alpha times the alpha=1 gradient there (as for H-DPO)."""
    lp_w, lp_l, ref_w, ref_l = _random(n=16)
    kw = {"loss_type": loss_type, "beta": 0.3, "label_smoothing": 0.1, **_length_kwargs(loss_type, 16)}
    a_w, a_l = lp_w.clone().requires_grad_(), lp_l.clone().requires_grad_()
    out = preference_loss(a_w, a_l, ref_w, ref_l, alpha=alpha, **kw)
    s_w, s_l = (alpha * lp_w).requires_grad_(), (alpha * lp_l).requires_grad_()
    one = preference_loss(s_w, s_l, ref_w, ref_l, alpha=1.0, **kw)
    torch.testing.assert_close(out.losses, one.losses, rtol=1e-12, atol=1e-12)
    out.losses.sum().backward()
    one.losses.sum().backward()
    torch.testing.assert_close(a_w.grad, alpha * s_w.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(a_l.grad, alpha * s_l.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("eps", [1e-3, 0.1, 0.3])
def test_exo_pair_is_zero_with_zero_gradient_at_its_target(eps):
    """The reverse KL to (1 - eps, eps) vanishes where sigmoid(z) = 1 - eps, z* = ln((1 - eps)/eps)."""
    beta = 0.5
    z_star = math.log((1 - eps) / eps)
    lp_w = torch.tensor([z_star / beta], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    out = preference_loss(lp_w, zero, zero, zero, loss_type="exo_pair", beta=beta, label_smoothing=eps)
    assert out.losses.item() == pytest.approx(0.0, abs=1e-12)
    (grad,) = torch.autograd.grad(out.losses.sum(), lp_w)
    assert grad.item() == pytest.approx(0.0, abs=1e-12)


def test_exo_pair_at_zero_margin():
    """z = 0: both probabilities 1/2, loss = 1/2*(-ln 2 - ln(1 - eps)) + 1/2*(-ln 2 - ln eps)
    = -ln 2 - ln(eps*(1 - eps))/2; eps = 1e-3: -0.6931471806 + 3.4543778894 = 2.7612307091."""
    zeros = torch.zeros(3, dtype=torch.float64)
    out = preference_loss(zeros, zeros, zeros, zeros, loss_type="exo_pair", label_smoothing=1e-3)
    torch.testing.assert_close(
        out.losses, torch.full((3,), 2.7612307091, dtype=torch.float64), atol=1e-9, rtol=0
    )


def test_nca_pair_against_its_written_form_and_at_zero():
    """-logsigmoid(u_w) - logsigmoid(-u_w)/2 - logsigmoid(-u_l)/2 with u = beta*r; at r = 0 all three
    terms are ln 2 (halved twice): 2 ln 2."""
    lp_w, lp_l, ref_w, ref_l = _random(n=16)
    u_w, u_l = 0.3 * (lp_w - ref_w), 0.3 * (lp_l - ref_l)
    expected = -F.logsigmoid(u_w) - 0.5 * F.logsigmoid(-u_w) - 0.5 * F.logsigmoid(-u_l)
    out = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type="nca_pair", beta=0.3)
    torch.testing.assert_close(out.losses, expected, rtol=1e-12, atol=1e-12)
    zeros = torch.zeros(2, dtype=torch.float64)
    at_zero = preference_loss(zeros, zeros, zeros, zeros, loss_type="nca_pair").losses
    torch.testing.assert_close(at_zero, torch.full((2,), 2 * math.log(2), dtype=torch.float64))


def test_sppo_hard_is_half_ipo_at_half_beta_plus_the_sum_term():
    """(r_w - c)^2 + (r_l + c)^2 = (h - 2c)^2/2 + (r_w + r_l)^2/2, c = 1/(2*beta): IPO at beta/2 is
    (h - 1/beta)^2."""
    lp_w, lp_l, ref_w, ref_l = _random(n=16)
    beta = 0.4
    r_sum = (lp_w - ref_w) + (lp_l - ref_l)
    ipo = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type="ipo", beta=beta / 2).losses
    sppo = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type="sppo_hard", beta=beta).losses
    torch.testing.assert_close(sppo, ipo / 2 + r_sum**2 / 2, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("loss_type", ["apo_zero", "apo_down"])
def test_apo_loss_and_its_mirror_sum_to_two(loss_type):
    """Negating both log-ratios maps each sigmoid(x) to sigmoid(-x) = 1 - sigmoid(x): loss(r) + loss(-r) = 2.
    So each loss lies in [0, 2]."""
    lp_w, lp_l, ref_w, ref_l = _random(n=16)
    out = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type=loss_type, beta=0.3).losses
    mirror = preference_loss(2 * ref_w - lp_w, 2 * ref_l - lp_l, ref_w, ref_l, loss_type=loss_type, beta=0.3)
    torch.testing.assert_close(out + mirror.losses, torch.full((16,), 2.0, dtype=torch.float64))


def test_apo_gradient_directions():
    """APO-zero pushes the chosen log-prob up and the rejected down everywhere; APO-down pushes the
    rejected down everywhere, and at r_l = 0 its chosen gradient vanishes
    (sigmoid'(u_w) - sigmoid'(-u_w) = 0)."""
    lp_w, lp_l, ref_w, ref_l = _random(n=16)
    for loss_type in ("apo_zero", "apo_down"):
        a, b = lp_w.clone().requires_grad_(), lp_l.clone().requires_grad_()
        preference_loss(a, b, ref_w, ref_l, loss_type=loss_type, beta=0.3).losses.sum().backward()
        assert (b.grad > 0).all(), (loss_type, b.grad)
        if loss_type == "apo_zero":
            assert (a.grad < 0).all(), a.grad
    a = lp_w.clone().requires_grad_()
    preference_loss(a, ref_l, ref_w, ref_l, loss_type="apo_down", beta=0.3).losses.sum().backward()
    torch.testing.assert_close(a.grad, torch.zeros(16, dtype=torch.float64), atol=1e-15, rtol=0)


def test_discopop_stable_form_equals_the_written_one():
    """(1 - sigmoid(z/tau)) * -logsigmoid(z) + sigmoid(z/tau) * exp(-z), evaluated naively at moderate z."""
    lp_w, lp_l, ref_w, ref_l = _random(n=32)
    beta, tau = 0.2, 0.05
    z = beta * ((lp_w - ref_w) - (lp_l - ref_l))
    m = torch.sigmoid(z / tau)
    expected = (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)
    out = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type="discopop", beta=beta, discopop_tau=tau)
    torch.testing.assert_close(out.losses, expected, rtol=1e-12, atol=1e-12)


def test_discopop_limits():
    """z = 0: m = 1/2 for any tau, loss (ln 2 + 1)/2 = 0.8465735903. As tau -> 0 the weight becomes a step:
    exp(-z) for z > 0, softplus(-z) (DPO) for z < 0."""
    zeros = torch.zeros(1, dtype=torch.float64)
    for tau in (0.05, 1.0, 10.0):
        out = preference_loss(zeros, zeros, zeros, zeros, loss_type="discopop", discopop_tau=tau)
        assert out.losses.item() == pytest.approx((math.log(2) + 1) / 2, rel=1e-12)
    z = torch.tensor([-3.0, -0.5, 0.5, 3.0], dtype=torch.float64)
    out = preference_loss(
        z,
        torch.zeros(4, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
        loss_type="discopop",
        beta=1.0,
        discopop_tau=1e-3,
    )
    expected = torch.where(z > 0, torch.exp(-z), F.softplus(-z))
    torch.testing.assert_close(out.losses, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- bad hyperparameters


def test_alpha_applies_exactly_to_the_losses_built_on_hdpos_reward():
    """Every other type, TDPO included, has a reason on record (the config error quotes it)."""
    for loss_type in (*LOSS_TYPES, *TDPO_LOSS_TYPES):
        why = alpha_does_not_apply(loss_type)
        if loss_type in ("hdpo", "robust", "sigmoid_norm", "dpop"):
            assert why is None
        else:
            assert why.startswith("alpha is H-DPO's entropy weight") and len(why) > 150, (loss_type, why)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "exo_pair"}, "label_smoothing"),
        ({"loss_type": "nca_pair", "label_smoothing": 0.1}, "label_smoothing"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau"),
        ({"loss_type": "dpop", "dpop_lambda": -1.0}, "dpop_lambda must be a finite number >= 0"),
        ({"loss_type": "sigmoid_norm"}, "chosen_token_counts"),
        ({"loss_type": "sigmoid_norm", "chosen_token_counts": torch.tensor([3])}, "rejected_token_counts"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
        (
            {"loss_type": "nca_pair", "alpha": 0.9},
            "alpha=0.9 has no effect with loss_type='nca_pair': alpha is",
        ),
        ({"loss_type": "ipo", "alpha": 0.9}, "IPO regresses"),
        ({"loss_type": "fdpo_js", "alpha": 0.9}, "f-divergence does not split"),
    ],
)
def test_invalid_hyperparameters_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        preference_loss(*_pair(), **kwargs)


# ---------------------------------------------------------------- the objective path


BASE = ["model.name_or_path=configs/models/tiny-demo", "data.train_files=[a.jsonl]"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.type=discopop", "loss.discopop_tau=0.2", "loss.beta=0.5"],
        ["loss.type=sigmoid_norm", "loss.alpha=0.9", "loss.label_smoothing=0.1"],
        ["loss.type=exo_pair", "loss.beta=0.5"],
        ["loss.type=robust", "loss.alpha=0.8", "loss.label_smoothing=0.2", "loss.nll_weight=0.3"],
    ],
)
def test_the_objective_passes_every_key_and_both_token_counts(overrides):
    """make_objective(cfg.loss) -> pair_loss(PairTerms, alpha) equals preference_loss called with the
    config's values by hand (exo_pair: label_smoothing 0 reads as EXO's 1e-3)."""
    cfg = load_config(None, [*BASE, *overrides])
    if cfg.loss.type == "exo_pair":
        assert cfg.loss.label_smoothing == EXO_DEFAULT_EPSILON == 1e-3
    lp_w, lp_l, ref_w, ref_l = _random(n=5)
    n_w, n_l = torch.tensor([3, 1, 8, 2, 5]), torch.tensor([6, 2, 1, 9, 4])
    terms = PairTerms(lp_w, lp_l, ref_w, ref_l, chosen_tokens=n_w, rejected_tokens=n_l)
    got = make_objective(cfg.loss, chunk_size=8).pair_loss(terms, cfg.loss.alpha)
    loss = cfg.loss
    expected = preference_loss(
        lp_w,
        lp_l,
        ref_w,
        ref_l,
        loss_type=loss.type,
        beta=loss.beta,
        alpha=loss.alpha,
        label_smoothing=loss.label_smoothing,
        nll_weight=loss.nll_weight,
        discopop_tau=loss.discopop_tau,
        chosen_token_counts=n_w,
        rejected_token_counts=n_l,
    )
    torch.testing.assert_close(got.losses, expected.losses, rtol=0, atol=0)
    torch.testing.assert_close(got.chosen_rewards, expected.chosen_rewards, rtol=0, atol=0)
    # the values did reach the loss: the default hyper-parameters give another loss
    plain = preference_loss(
        lp_w,
        lp_l,
        ref_w,
        ref_l,
        loss_type=loss.type,
        label_smoothing=1e-3 if loss.type == "exo_pair" else 0,
        chosen_token_counts=n_w,
        rejected_token_counts=n_w,
    )
    assert not torch.allclose(got.losses, plain.losses)
