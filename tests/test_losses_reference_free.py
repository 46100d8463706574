"""The reference-free losses (SimPO, CPO, ORPO) against hand-worked numbers, independent formulas, autograd
and float32 extremes.

Shared worked example unless a test says otherwise (one pair):
    lp_w = -6 over n_w = 4 tokens, lp_l = -12 over n_l = 6 tokens,
    so the mean per-token log-probs are m_w = -1.5 and m_l = -2.
softplus(x) = ln(1 + e^x) and -logsigmoid(z) = softplus(-z).
"""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import pytest
import torch

from hdpo_ds.objectives.losses import preference_loss
from hdpo_ds.objectives.reference_free import (
    ORPO_MAX_MEAN_LOGP,
    REFERENCE_FREE_LOSS_TYPES,
    cpo_loss,
    log1mexp,
    orpo_loss,
    reference_free_loss,
    simpo_loss,
)


def _pair(dtype=torch.float64):
    t = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
    return t(-6.0), t(-12.0), torch.tensor([4]), torch.tensor([6])


def _check(out, loss, chosen_reward, rejected_reward):
    for got, expected in zip(out, (loss, chosen_reward, rejected_reward), strict=True):
        torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-10)


def test_simpo_worked_example():
    """beta = 2, gamma = 0.5: rewards r = beta * m: r_w = 2 * (-1.5) = -3, r_l = 2 * (-2) = -4;
    z = r_w - r_l - gamma = 1 - 0.5 = 0.5; loss = softplus(-0.5) = ln(1 + e^-0.5) = ln(1.6065307)
    = 0.4740769842."""
    out = simpo_loss(*_pair(), beta=2.0, gamma=0.5)
    _check(out, 0.4740769841801067, -3.0, -4.0)


def test_cpo_worked_example():
    """beta = 0.1: rewards r = beta * lp: r_w = -0.6, r_l = -1.2; preference term softplus(-(r_w - r_l))
    = ln(1 + e^-0.6) = ln(1.5488116) = 0.4374879505; NLL per chosen token -lp_w / n_w = 6 / 4 = 1.5;
    loss = 1.9374879505."""
    lp_w, lp_l, n_w, _ = _pair()
    out = cpo_loss(lp_w, lp_l, n_w, beta=0.1)
    _check(out, 1.9374879504858855, -0.6, -1.2)


def test_orpo_worked_example():
    """beta (lambda) = 0.1. p_w = e^-1.5 = 0.2231301601, 1 - p_w = 0.7768698399, ln(1 - p_w) = -0.2524824589,
    log odds_w = -1.5 + 0.2524824589 = -1.2475175411; p_l = e^-2 = 0.1353352832, 1 - p_l = 0.8646647168,
    ln(1 - p_l) = -0.1454134579, log odds_l = -2 + 0.1454134579 = -1.8545865421. Their difference is
    0.6070690011; L_OR = ln(1 + e^-0.6070690011) = ln(1.5449457) = 0.4349888069; NLL = -m_w = 1.5;
    loss = 1.5 + 0.1 * 0.4349888069 = 1.5434988807. Rewards beta * m: -0.15 and -0.2."""
    out = orpo_loss(*_pair(), beta=0.1)
    _check(out, 1.543498880687054, -0.15, -0.2)


def _random(n=32, seed=0, dtype=torch.float64, scale=40.0):
    g = torch.Generator().manual_seed(seed)
    lp_w = -(torch.rand(n, generator=g, dtype=dtype) * scale + 0.05)
    lp_l = -(torch.rand(n, generator=g, dtype=dtype) * scale + 0.05)
    n_w = torch.randint(1, 30, (n,), generator=g)
    n_l = torch.randint(1, 30, (n,), generator=g)
    return lp_w, lp_l, n_w, n_l


@pytest.mark.parametrize("n", [1, 3, 17, 512])
def test_simpo_at_equal_lengths_is_reference_free_dpo(n):
    """With n_w = n_l = n, SimPO is DPO with its reference log-probs at 0 and beta/n, shifted by gamma:
    -logsigmoid(beta/n * (lp_w - lp_l) - gamma), written here from that formula in float64."""
    lp_w, lp_l, _, _ = _random(seed=n)
    counts = torch.full_like(lp_w, n, dtype=torch.long)
    beta, gamma = 2.5, 0.7
    expected = torch.log1p(torch.exp(-(beta / n * (lp_w - lp_l) - gamma)))
    got = simpo_loss(lp_w, lp_l, counts, counts, beta=beta, gamma=gamma).losses
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_cpo_is_dpo_with_a_uniform_reference_plus_the_chosen_nll():
    """Xu et al. derive CPO from DPO with a uniform reference, whose log-ratio terms cancel: the preference
    term is preference_loss (DPO, alpha 1) with both reference log-probs 0; then + (-lp_w / n_w)."""
    lp_w, lp_l, n_w, _ = _random(seed=5)
    zeros = torch.zeros_like(lp_w)
    dpo = preference_loss(lp_w, lp_l, zeros, zeros, loss_type="dpo", beta=0.3).losses
    got = cpo_loss(lp_w, lp_l, n_w, beta=0.3).losses
    torch.testing.assert_close(got, dpo - lp_w / n_w, rtol=1e-12, atol=1e-12)


def test_orpo_matches_the_odds_computed_from_probabilities():
    """ORPO from the definitions, with Python floats: P = exp(lp / n), odds = P / (1 - P),
    loss = -log P_w + beta * ln(1 + odds_l / odds_w). Moderate values, where 1 - P loses no digits."""
    lp_w, lp_l, n_w, n_l = _random(seed=7, scale=8.0)
    beta = 0.25
    expected = []
    for a, b, na, nb in zip(lp_w.tolist(), lp_l.tolist(), n_w.tolist(), n_l.tolist(), strict=True):
        p_w, p_l = math.exp(a / na), math.exp(b / nb)
        odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
        expected.append(-math.log(p_w) + beta * math.log1p(odds_l / odds_w))
    got = orpo_loss(lp_w, lp_l, n_w, n_l, beta=beta).losses
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", REFERENCE_FREE_LOSS_TYPES)
def test_gradcheck_float64(loss_type):
    lp_w, lp_l, n_w, n_l = _random(n=6, seed=11, scale=10.0)
    lp_w.requires_grad_()
    lp_l.requires_grad_()

    def losses(a, b):
        return reference_free_loss(loss_type, a, b, n_w, n_l, beta=0.7, simpo_gamma=0.3).losses

    assert torch.autograd.gradcheck(losses, (lp_w, lp_l))


# Summed log-probs from -200 to 0, p -> 1 included (-1e-7 and 0 exactly), over 1, 3 and 50 tokens.
_EXTREMES = [-200.0, -150.0, -50.0, -10.0, -1.0, -1e-3, -1e-7, 0.0]


@pytest.mark.parametrize("loss_type", REFERENCE_FREE_LOSS_TYPES)
@pytest.mark.parametrize("tokens", [1, 3, 50])
def test_finite_losses_and_gradients_in_float32(loss_type, tokens):
    grid = torch.tensor([(a, b) for a in _EXTREMES for b in _EXTREMES], dtype=torch.float32)
    lp_w = grid[:, 0].clone().requires_grad_()
    lp_l = grid[:, 1].clone().requires_grad_()
    counts = torch.full((len(grid),), tokens)
    out = reference_free_loss(loss_type, lp_w, lp_l, counts, counts, beta=2.0, simpo_gamma=0.5)
    assert out.losses.dtype == torch.float32
    for t in out:
        assert torch.isfinite(t).all(), t
    out.losses.sum().backward()
    assert torch.isfinite(lp_w.grad).all() and torch.isfinite(lp_l.grad).all()
    # never pushes the chosen response down or the rejected one up; the NLL of CPO and ORPO always pulls
    assert (lp_w.grad <= 0).all() and (lp_l.grad >= 0).all()
    if loss_type != "simpo":
        torch.testing.assert_close(lp_w.grad.max(), torch.tensor(-1.0 / tokens), rtol=1e-6, atol=0)


def test_orpo_near_certainty_keeps_its_limit():
    """As p_w -> 1 the chosen odds grow without bound and L_OR -> 0, while the NLL -m_w -> 0. With
    m_l = -2 (log odds_l = -2 - ln(1 - e^-2) = -1.8545865421) and one token per response:
    m_w = -1e-7: log odds_w = -1e-7 - ln(1 - e^-1e-7) = 16.1180955; L_OR = ln(1 + e^(-1.8546 - 16.1181))
    = 1.57e-8; loss = 1e-7 + 0.1 * L_OR. m_w = 0 exactly: the odds read ORPO_MAX_MEAN_LOGP = -1e-12,
    log odds_w = 27.6310211; L_OR = 1.57e-13; loss = 0 + 0.1 * L_OR. The expected values below evaluate
    these formulas in float64 at the float32 inputs."""
    lp_w = torch.tensor([-1e-7, 0.0], dtype=torch.float32)
    lp_l = torch.tensor([-2.0, -2.0], dtype=torch.float32)
    ones = torch.ones(2, dtype=torch.long)
    out = orpo_loss(lp_w, lp_l, ones, ones, beta=0.1)
    log_odds_l = -2.0 - math.log(-math.expm1(-2.0))
    expected = []
    for nll, m_odds in ((-float(lp_w[0]), float(lp_w[0])), (0.0, ORPO_MAX_MEAN_LOGP)):
        log_odds_w = m_odds - math.log(-math.expm1(m_odds))
        expected.append(nll + 0.1 * math.log1p(math.exp(log_odds_l - log_odds_w)))
    assert 16.1 < -math.log(-math.expm1(float(lp_w[0]))) < 16.2
    torch.testing.assert_close(
        out.losses.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0
    )


def test_log1mexp_keeps_float32_digits_where_the_naive_form_loses_them():
    """Against log(1 - e^x) in 50-digit decimal arithmetic: relative error < 1e-6 in float32 over x in
    [-200, -1e-7]; the naive log(1 - exp(x)) in float32 is far off near 0 (1 - exp(-1e-7) rounds to
    1.19e-7, a log of -15.94 for -16.12)."""
    getcontext().prec = 50
    xs = [-200.0, -30.0, -5.0, -1.0, -math.log(2.0) - 1e-6, -math.log(2.0) + 1e-6, -0.1, -1e-3, -1e-5, -1e-7]
    x32 = torch.tensor(xs, dtype=torch.float32)
    exact = torch.tensor([float((1 - Decimal(x).exp()).ln()) for x in x32.tolist()], dtype=torch.float64)
    got = log1mexp(x32).double()
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-30)
    naive = torch.log(1 - torch.exp(x32)).double()
    assert (naive[-1] - exact[-1]).abs() > 0.1  # the test above could fail: the naive form does
    assert log1mexp(torch.tensor([0.0])).item() == -math.inf


def test_log1mexp_gradient_is_finite_on_both_sides_of_the_switch():
    """torch.where passes a zero gradient to the discarded branch; fed a value past the switch, that
    branch's own derivative would be inf and 0 * inf NaN. d/dx log(1 - e^x) = -e^x / (1 - e^x)."""
    x = torch.tensor([-1e-6, -0.5, -0.7, -3.0, -200.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log1mexp(x).sum(), x)
    expected = torch.tensor([-math.exp(v) / -math.expm1(v) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("loss_type", REFERENCE_FREE_LOSS_TYPES)
def test_rewards_are_detached_and_losses_carry_gradient(loss_type):
    lp_w, lp_l, n_w, n_l = (t.requires_grad_() if t.is_floating_point() else t for t in _random(n=3))
    out = reference_free_loss(loss_type, lp_w, lp_l, n_w, n_l, beta=0.5)
    assert out.losses.requires_grad and out.losses.shape == (3,)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_rewards_are_each_papers():
    """SimPO beta*lp/n, CPO beta*lp, ORPO beta*lp/n (TRL's ORPO convention), on random pairs."""
    lp_w, lp_l, n_w, n_l = _random(seed=3)
    simpo = simpo_loss(lp_w, lp_l, n_w, n_l, beta=2.0)
    torch.testing.assert_close(simpo.chosen_rewards, 2.0 * lp_w / n_w, rtol=1e-15, atol=0)
    torch.testing.assert_close(simpo.rejected_rewards, 2.0 * lp_l / n_l, rtol=1e-15, atol=0)
    cpo = cpo_loss(lp_w, lp_l, n_w, beta=0.2)
    torch.testing.assert_close(cpo.chosen_rewards, 0.2 * lp_w, rtol=1e-15, atol=0)
    orpo = orpo_loss(lp_w, lp_l, n_w, n_l, beta=0.1)
    torch.testing.assert_close(orpo.rejected_rewards, 0.1 * lp_l / n_l, rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda p: simpo_loss(*p, beta=0.0), "beta"),
        (lambda p: simpo_loss(*p, gamma=-0.1), "gamma"),
        (lambda p: cpo_loss(p[0], p[1], p[2], beta=-1.0), "beta"),
        (lambda p: orpo_loss(*p, beta=0.0), "beta"),
        (lambda p: orpo_loss(p[0], p[1], p[2], None), "rejected_tokens"),
        (lambda p: simpo_loss(p[0], p[1], p[2], torch.tensor([1, 2])), "same shape"),
        (lambda p: reference_free_loss("kto", *p, beta=0.1), "unknown reference-free loss_type 'kto'"),
    ],
)
def test_bad_arguments_name_the_parameter(call, name):
    with pytest.raises(ValueError, match=name):
        call(_pair())


def test_bf16_inputs_compute_in_float32():
    lp_w, lp_l, n_w, n_l = _random(n=8)
    out = orpo_loss(lp_w.to(torch.bfloat16), lp_l.to(torch.bfloat16), n_w, n_l)
    assert out.losses.dtype == torch.float32
    expected = orpo_loss(lp_w.to(torch.bfloat16).float(), lp_l.to(torch.bfloat16).float(), n_w, n_l)
    torch.testing.assert_close(out.losses, expected.losses, rtol=0, atol=0)
