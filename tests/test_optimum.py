"""The population optima of H-DPO, IPO and cDPO, checked exactly on a finite set of responses.

Setup. One prompt, K = 6 responses y = 0..K-1. The policy is a softmax over K logits theta (the last one
fixed at 0, leaving K - 1 free parameters, which is every full-support distribution); its "sequence
log-probs" are lp = log_softmax(theta). The reference is a fixed, non-uniform distribution REF (a
uniform one would make ref^(1/alpha), ref and ref^alpha the same distribution, so it could not tell where
alpha sits). Preference data are not sampled: the loss is the exact expected loss over pairs,

    L(theta) = sum over ordered pairs (i, j), i != j, of mu(i) mu(j) p(i > j) loss(i chosen, j rejected)

divided by sum_{i != j} mu(i) mu(j) p(i > j), where mu is the pair-sampling distribution (y, y' ~ mu
independently; a pair with y = y' carries no gradient and is left out) and p(i > j) the preference
probability, here Bradley-Terry: p(i > j) = sigmoid(r_i - r_j). `loss` is
`hdpo_ds.objectives.losses.preference_loss` itself. Every one of these losses depends on theta only through
the differences lp_i - lp_j = theta_i - theta_j (log-softmax's normaliser cancels), and is convex in them, so
L is convex in theta and strictly convex in the K - 1 free logits (all pairs are weighted > 0); its one
stationary point is the global minimum, found here by damped Newton steps (autograd gradient and Hessian of L)
until the gradient norm is below GRAD_TOL.

H-DPO (Omura et al. 2024, arXiv:2411.07595, Sec. 3). Per pair z = g_i - g_j with
g = alpha*beta*lp - beta*log ref, loss -log sigmoid(z). Group the ordered pairs (i, j) and (j, i): with
d = g_i - g_j their weighted sum is mu(i) mu(j) [p(i > j) (-log sigmoid(d)) + p(j > i) (-log sigmoid(-d))],
the cross-entropy between Bernoulli(p(i > j)) and Bernoulli(sigmoid(d)), which is minimised, uniquely, at
sigmoid(d) = p(i > j), i.e. d = r_i - r_j. All these minima are reached at once by g = r + const, which the
policy can represent (theta is unrestricted). So the minimiser has alpha*beta*log pi - beta*log ref =
r + const, that is

    pi*(y) ∝ ref(y)^(1/alpha) exp(r(y) / (alpha*beta)),

whatever mu is (as long as every pair has weight > 0): the model is well specified, so pair sampling does
not move the optimum. The wrong closed forms the test must tell apart (distinct from pi* when alpha != 1):
ref^alpha exp(r/beta), the optimum if alpha sat on the reference term instead
(z = beta*(lp_w - lp_l) - alpha*beta*(ref_w - ref_l)); ref exp(r/(alpha*beta)), if alpha scaled the
whole log-ratio (z = alpha*beta*h); ref^(1/alpha) exp(r/beta), alpha's exponent on ref without its
temperature on r; and ref exp(r/beta), alpha ignored (DPO).

IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
Sec. 4-5: the Psi-PO optimum with Psi the identity, pi ∝ ref exp(p(y > mu) / tau), tau = beta, and the
IPO loss; the project's per-pair loss is (h - 1/(2*beta))^2 with h = (lp_w - ref_w) - (lp_l - ref_l)).
Derived here for the pair sampling used: with u = lp - log ref, L is a quadratic in u; dL/du_k = 0
reads, after using p(k > j) + p(j > k) = 1,

    sum_j mu(j) [(u_k - u_j) - (2 p(k > j) - 1) / (2 beta)] = 0   for every k,

where the j = k term is 0 if p(k > k) = 1/2. Hence u_k - E_mu[u] = (P(k > mu) - 1/2) / beta with
P(k > mu) = sum_j mu(j) p(k > j), p(k > k) = 1/2, and

    pi*(y) ∝ ref(y) exp(P(y > mu) / beta),

which depends on mu through P(y > mu): checked for mu uniform and mu = REF, each against the other's
closed form, and (for mu = REF) against the form with the self-pair term left out of P (p(k > k) = 0),
which differs by mu(y) / (2 beta).

cDPO (Mitchell 2023, label smoothing eps). Per pair -(1-eps) log sigmoid(z) - eps log sigmoid(-z), z as
for H-DPO. Grouping (i, j) with (j, i) as above gives a cross-entropy with target
q(i > j) = eps + (1 - 2 eps) p(i > j), minimised at d = f(r_i - r_j) with
f(x) = logit(eps + (1 - 2 eps) sigmoid(x)): label smoothing shrinks the reward differences, it does not
keep them. For K = 2 there is a single difference, so the optimum is exact:
pi*(0) / pi*(1) = (ref(0)/ref(1))^(1/alpha) exp(f(r_0 - r_1) / (alpha*beta)). For K >= 3 there is no
closed form: f is not linear (for eps > 0), so f(r_i - r_j) is not a difference s_i - s_j for all pairs,
the pairwise minima cannot all be reached, and the minimiser is a mu-weighted compromise; the test checks
that it moves with mu, unlike H-DPO's.

Numbers (KL achieved, margins): docs/results.md, "The optimum, checked exactly".
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hdpo_ds.objectives.losses import preference_loss

F64 = torch.float64
# Non-uniform reference; the highest rewards go to the least likely responses, so reward and reference
# pull apart and every placement of alpha gives a visibly different optimum.
REF = torch.tensor([0.02, 0.05, 0.13, 0.20, 0.25, 0.35], dtype=F64)
K = REF.numel()
# H-DPO's reward, small enough that pi* is not a point mass at beta = 0.1 (where the wrong forms would
# all agree with it on the one response that has the mass).
REWARD_HDPO = torch.tensor([0.45, 0.25, 0.10, 0.0, -0.20, -0.50], dtype=F64)
# IPO's (and the cDPO K = 6 check's) reward, wide enough that sigmoid is far from linear over its
# differences: mu moves IPO's optimum, and cDPO's f departs from linear, only through that curvature.
REWARD_WIDE = 6 * REWARD_HDPO
UNIFORM = torch.full((K,), 1.0 / K, dtype=F64)

GRAD_TOL = 1e-12  # gradient norm of the (normalised) expected loss at which training stops
KL_BOUND = 1e-12  # KL(pi* || pi_learned) allowed, float64
MARGIN = 1e-4  # least KL(wrong closed form || pi_learned) for the test to tell the forms apart

ALPHAS = (0.7, 0.9, 1.0, 1.3)
BETAS = (0.1, 0.5, 1.0)


def bradley_terry(reward: torch.Tensor) -> torch.Tensor:
    """(K, K) matrix of p(i > j) = sigmoid(r_i - r_j); its diagonal is 1/2."""
    return torch.sigmoid(reward[:, None] - reward[None, :])


def expected_loss(
    logits: torch.Tensor, pref: torch.Tensor, mu: torch.Tensor, log_ref: torch.Tensor, **loss_kwargs
) -> torch.Tensor:
    """Exact expected `preference_loss` over ordered pairs i != j, weights mu(i) mu(j) pref[i, j], normalised.

    logits: (K,) policy logits; pref: (K, K) p(i > j); mu: (K,) pair-sampling distribution; log_ref: (K,).
    """
    k = logits.numel()
    chosen, rejected = (torch.tensor(ix) for ix in zip(*itertools.permutations(range(k), 2), strict=True))
    lp = torch.log_softmax(logits, dim=0)
    out = preference_loss(lp[chosen], lp[rejected], log_ref[chosen], log_ref[rejected], **loss_kwargs)
    weight = mu[chosen] * mu[rejected] * pref[chosen, rejected]
    return (weight * out.losses).sum() / weight.sum()


def train(pref: torch.Tensor, mu: torch.Tensor, ref: torch.Tensor, **loss_kwargs) -> torch.Tensor:
    """Minimise `expected_loss` over K - 1 free logits (the last is 0) by damped Newton; return log pi (K,).

    Fails if the gradient norm does not fall below GRAD_TOL within the step budget.
    """
    log_ref = ref.log()

    def objective(free: torch.Tensor) -> torch.Tensor:
        return expected_loss(torch.cat([free, free.new_zeros(1)]), pref, mu, log_ref, **loss_kwargs)

    # 30-element tensors: on this shared 2-core machine the intra-op thread pool made one logsigmoid
    # take 6 ms against 1 us on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _newton(objective, ref.numel() - 1)
    finally:
        torch.set_num_threads(threads)


def _newton(objective, n: int) -> torch.Tensor:
    """Damped Newton on objective((n,) free logits), from 0; returns log pi (n + 1,) with the last logit 0."""
    free = torch.zeros(n, dtype=F64)
    for _ in range(100):
        x = free.clone().requires_grad_(True)
        value = objective(x)
        (grad,) = torch.autograd.grad(value, x)
        if grad.norm() < GRAD_TOL:
            return torch.log_softmax(torch.cat([free, free.new_zeros(1)]), dim=0)
        step = torch.linalg.solve(torch.autograd.functional.hessian(objective, free), grad)
        # Halve the Newton step until the loss does not rise (beyond float64 rounding of a loss ~ 1).
        size = 1.0
        while objective(free - size * step) > value + 1e-14 and size > 1e-6:
            size /= 2
        free = free - size * step
    raise AssertionError(f"no convergence: gradient norm {grad.norm().item():.3e} after 100 Newton steps")


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """KL(p || q) in nats from (K,) log-probs."""
    return float((log_p.exp() * (log_p - log_q)).sum())


def normalised(log_unnormalised: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(log_unnormalised, dim=0)


def hdpo_closed_forms(alpha: float, beta: float) -> dict[str, torch.Tensor]:
    """The optimum and the wrong placements of alpha, as (K,) log-probs."""
    lr, r = REF.log(), REWARD_HDPO
    return {
        "ref^(1/alpha) exp(r/(alpha*beta))": normalised(lr / alpha + r / (alpha * beta)),
        "ref^alpha exp(r/beta)": normalised(alpha * lr + r / beta),
        "ref exp(r/(alpha*beta))": normalised(lr + r / (alpha * beta)),
        "ref^(1/alpha) exp(r/beta)": normalised(lr / alpha + r / beta),
        "ref exp(r/beta)": normalised(lr + r / beta),
    }


def ipo_closed_form(mu: torch.Tensor, beta: float, *, self_pairs: bool = True) -> torch.Tensor:
    """(K,) log pi* = log ref + P(y > mu)/beta, normalised; self_pairs=False drops the p(y > y) = 1/2 term."""
    pref = bradley_terry(REWARD_WIDE)
    wins = pref @ mu - (0.0 if self_pairs else 0.5 * mu)
    return normalised(REF.log() + wins / beta)


SKEWED = torch.tensor([0.40, 0.05, 0.05, 0.10, 0.10, 0.30], dtype=F64)
MUS = {"uniform": UNIFORM, "ref": REF, "skewed": SKEWED}
OPTIMUM = "ref^(1/alpha) exp(r/(alpha*beta))"


def hdpo_kls(alpha: float, beta: float, mu_name: str = "uniform") -> dict[str, float]:
    """KL(form || pi_learned) for H-DPO's optimum (OPTIMUM) and each wrong closed form."""
    learned = train(bradley_terry(REWARD_HDPO), MUS[mu_name], REF, loss_type="hdpo", beta=beta, alpha=alpha)
    return {name: kl(form, learned) for name, form in hdpo_closed_forms(alpha, beta).items()}


def ipo_kls(mu_name: str, beta: float) -> dict[str, float]:
    """KL(form || pi_learned) for IPO trained with pairs from mu: its optimum, the other mu's, no
    self-pairs."""
    mu, other = MUS[mu_name], MUS["ref" if mu_name == "uniform" else "uniform"]
    learned = train(bradley_terry(REWARD_WIDE), mu, REF, loss_type="ipo", beta=beta)
    return {
        "optimum": kl(ipo_closed_form(mu, beta), learned),
        "other mu": kl(ipo_closed_form(other, beta), learned),
        "no self-pairs": kl(ipo_closed_form(mu, beta, self_pairs=False), learned),
    }


CDPO_REF = torch.tensor([0.3, 0.7], dtype=F64)
CDPO_REWARD = torch.tensor([0.3, -0.2], dtype=F64)


def cdpo_two_response_kls(alpha: float, beta: float, eps: float) -> dict[str, float]:
    """K = 2, mu uniform: KL(form || pi_learned) for the smoothed optimum and the unsmoothed one."""
    kwargs = dict(loss_type="hdpo", beta=beta, alpha=alpha, label_smoothing=eps)
    learned = train(bradley_terry(CDPO_REWARD), torch.full((2,), 0.5, dtype=F64), CDPO_REF, **kwargs)
    q = eps + (1 - 2 * eps) * torch.sigmoid(CDPO_REWARD[0] - CDPO_REWARD[1])
    shrunk = torch.stack([torch.logit(q), torch.zeros((), dtype=F64)])
    log_ref = CDPO_REF.log()
    return {
        "optimum": kl(normalised(log_ref / alpha + shrunk / (alpha * beta)), learned),
        "unsmoothed": kl(normalised(log_ref / alpha + CDPO_REWARD / (alpha * beta)), learned),
    }


def cdpo_mu_shift_kl(alpha: float = 0.9, beta: float = 0.5, eps: float = 0.1) -> float:
    """K = 6: KL(pi_learned(mu uniform) || pi_learned(mu = REF)) under cDPO."""
    kwargs = dict(loss_type="hdpo", beta=beta, alpha=alpha, label_smoothing=eps)
    pref = bradley_terry(REWARD_WIDE)
    return kl(train(pref, UNIFORM, REF, **kwargs), train(pref, REF, REF, **kwargs))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_hdpo_learns_the_closed_form_optimum(alpha, beta):
    kls = hdpo_kls(alpha, beta)
    assert kls.pop(OPTIMUM) < KL_BOUND
    if alpha != 1.0:  # at alpha = 1 all the forms are DPO's optimum
        assert min(kls.values()) > MARGIN, kls


@pytest.mark.parametrize(("alpha", "beta"), [(0.7, 0.1), (1.3, 1.0)])
@pytest.mark.parametrize("mu_name", ["ref", "skewed"])
def test_hdpo_optimum_does_not_depend_on_pair_sampling(mu_name, alpha, beta):
    """Bradley-Terry over all pairs is well specified: pairs from mu = REF or a skewed mu give the same
    pi*."""
    assert hdpo_kls(alpha, beta, mu_name)[OPTIMUM] < KL_BOUND


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("mu_name", ["uniform", "ref"])
def test_ipo_learns_the_closed_form_optimum_for_its_pair_sampling(mu_name, beta):
    kls = ipo_kls(mu_name, beta)
    assert kls["optimum"] < KL_BOUND
    # The other sampling's optimum is a different distribution, and the test sees the difference.
    assert kls["other mu"] > MARGIN
    if mu_name == "ref":  # for a uniform mu the self-pair term is a constant and cancels
        assert kls["no self-pairs"] > MARGIN


@pytest.mark.parametrize("eps", [0.1, 0.25])
@pytest.mark.parametrize(("alpha", "beta"), [(0.7, 0.1), (1.0, 0.5), (1.3, 1.0)])
def test_cdpo_two_responses_learn_the_shrunk_reward_difference(alpha, beta, eps):
    """K = 2: alpha*beta*(lp_0 - lp_1) - beta*log(ref_0/ref_1) = logit(eps + (1-2 eps) sigmoid(r_0 - r_1))."""
    kls = cdpo_two_response_kls(alpha, beta, eps)
    assert kls["optimum"] < KL_BOUND
    assert kls["unsmoothed"] > MARGIN  # label smoothing moves the optimum


def test_cdpo_optimum_moves_with_pair_sampling_for_three_or_more_responses():
    """K = 6: the smoothed targets are not differences of one reward, so mu decides the compromise."""
    assert cdpo_mu_shift_kl() > MARGIN


def _markdown_tables() -> str:
    """The tables of docs/results.md's section "The optimum, checked exactly"; each cell
    KL(form || learned)."""
    wrong = [name for name in hdpo_closed_forms(1.0, 1.0) if name != OPTIMUM]
    lines = [
        f"| alpha | beta | pi* = {OPTIMUM} | " + " | ".join(wrong) + " |",
        "|---" * (3 + len(wrong)) + "|",
    ]
    for alpha, beta in itertools.product(ALPHAS, BETAS):
        kls = hdpo_kls(alpha, beta)
        rest = " | ".join("(= pi*)" if alpha == 1.0 else f"{kls[w]:.2e}" for w in wrong)
        lines.append(f"| {alpha} | {beta} | {kls[OPTIMUM]:.1e} | {rest} |")
    lines += ["", "| H-DPO, pairs from mu | alpha | beta | pi* |", "|---|---|---|---|"]
    for mu_name, (alpha, beta) in itertools.product(("ref", "skewed"), [(0.7, 0.1), (1.3, 1.0)]):
        lines.append(f"| {mu_name} | {alpha} | {beta} | {hdpo_kls(alpha, beta, mu_name)[OPTIMUM]:.1e} |")
    lines += [
        "",
        "| IPO, pairs from mu | beta | pi*(mu) | pi*(the other mu) | pi*(mu) without self-pairs |",
        "|---|---|---|---|---|",
    ]
    for mu_name, beta in itertools.product(("uniform", "ref"), BETAS):
        kls = ipo_kls(mu_name, beta)
        no_self = "(= pi*)" if mu_name == "uniform" else f"{kls['no self-pairs']:.2e}"
        lines.append(f"| {mu_name} | {beta} | {kls['optimum']:.1e} | {kls['other mu']:.2e} | {no_self} |")
    lines += [
        "",
        "| cDPO, K = 2: alpha | beta | eps | smoothed pi* | unsmoothed pi* |",
        "|---|---|---|---|---|",
    ]
    for (alpha, beta), eps in itertools.product([(0.7, 0.1), (1.0, 0.5), (1.3, 1.0)], (0.1, 0.25)):
        kls = cdpo_two_response_kls(alpha, beta, eps)
        lines.append(f"| {alpha} | {beta} | {eps} | {kls['optimum']:.1e} | {kls['unsmoothed']:.2e} |")
    shift = cdpo_mu_shift_kl()
    lines += [
        "",
        f"cDPO, K = 6 (alpha 0.9, beta 0.5, eps 0.1), learned with mu uniform against mu = ref: {shift:.2e}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(_markdown_tables())
