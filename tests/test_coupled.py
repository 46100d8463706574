"""Losses coupled across the optimizer step: bco_pair's reward baseline and AOT's sorted pairing
(objectives/coupled.py; docs/design.md §4). Pure functions, the exactness of the two-pass AOT gradient
(several micro-batches on 2 simulated ranks against torch.sort inside autograd), the config refusals, and
real runs: 2 ranks against one process, and a killed bco_pair run resumed with its baseline."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from hdpo_ds.config import ConfigError, LossConfig, load_config
from hdpo_ds.objectives.coupled import (
    RewardBaseline,
    aot_loss,
    aot_partners,
    aot_sort_values,
    aot_sorted_loss,
    bco_pair_loss,
)
from hdpo_ds.objectives.objective import CoupledObjective, PairTerms, make_objective
from hdpo_ds.runtime import dist
from tests.run_helpers import PAIRS_PER_STEP, assert_grads_close, launch

BASE = ["model.name_or_path=configs/models/tiny-demo", "data.train_files=[a.jsonl]"]
SOFTPLUS_1 = math.log1p(math.e)  # softplus(1) = 1.3132617
SOFTPLUS_M1 = math.log1p(math.exp(-1))  # softplus(-1) = 0.3132617


def _t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ------------------------------------------------------------------------------------ the pure losses
def test_bco_pair_hand_worked():
    """beta 1, delta 0.5: r_w = 1.5, r_l = -0.5 -> softplus(-(1.5 - 0.5)) + softplus(-0.5 - 0.5) =
    2 softplus(-1) = 0.626523; beta 0.5, delta 0: r_w = 0.5*(-1 - -3) = 1, r_l = 0.5*(-4 - -2) = -1: the
    same 0.626523."""
    losses, chosen, rejected = bco_pair_loss(_t(1.5), _t(-0.5), _t(0.0), _t(0.0), beta=1.0, baseline=0.5)
    assert losses.item() == pytest.approx(2 * SOFTPLUS_M1, abs=1e-12)
    assert (chosen.item(), rejected.item()) == (1.5, -0.5)
    losses, _, _ = bco_pair_loss(_t(-1.0), _t(-4.0), _t(-3.0), _t(-2.0), beta=0.5, baseline=0.0)
    assert losses.item() == pytest.approx(2 * SOFTPLUS_M1, abs=1e-12)


def test_aot_hand_worked():
    """aot, beta 1: policy margins (2, 0), reference margins (1, 3). Sorted: (0, 2) against (1, 3), so
    pair 0 (margin 2) meets 3 and pair 1 (margin 0) meets 1: both losses softplus(-(-1)) = 1.313262."""
    lp_w, lp_l, ref_w, ref_l = _t(2.0, 1.0), _t(0.0, 1.0), _t(1.0, 3.0), _t(0.0, 0.0)
    values = aot_sort_values(lp_w, lp_l, ref_w, ref_l, unpaired=False)
    torch.testing.assert_close(values, _t(2.0, 0.0, 1.0, 3.0).reshape(2, 2).T.contiguous())
    partners = aot_partners(values)
    torch.testing.assert_close(partners[:, 0], _t(3.0, 1.0))
    losses, _, _ = aot_loss(lp_w, lp_l, ref_w, ref_l, partners, beta=1.0, label_smoothing=0.0, unpaired=False)
    torch.testing.assert_close(losses, _t(SOFTPLUS_1, SOFTPLUS_1))


def test_aot_unpaired_hand_worked():
    """aot_unpaired, beta 1: r_w = (1, -3), r_l = (0, 2). Sorted: (-3, 1) against (0, 2), deltas -3 and -1,
    sorted loss softplus(3) + softplus(1) = 3.048587 + 1.313262 = 4.361849. Pair 0: a = L(1 - 2), b =
    L(-3 - 0) -> (softplus(1) + softplus(3)) / 2; pair 1: a = L(-3 - 0), b = L(1 - 2): the same."""
    lp_w, lp_l, zeros = _t(1.0, -3.0), _t(0.0, 2.0), _t(0.0, 0.0)
    partners = aot_partners(aot_sort_values(lp_w, lp_l, zeros, zeros, unpaired=True))
    torch.testing.assert_close(partners, _t(2.0, -3.0, 0.0, 1.0).reshape(2, 2))
    losses, _, _ = aot_loss(lp_w, lp_l, zeros, zeros, partners, beta=1.0, label_smoothing=0.0, unpaired=True)
    half = (math.log1p(math.exp(3)) + SOFTPLUS_1) / 2
    torch.testing.assert_close(losses, _t(half, half))
    total = aot_sorted_loss(lp_w, lp_l, zeros, zeros, beta=1.0, label_smoothing=0.0, unpaired=True)
    assert total.item() == pytest.approx(4.361849, abs=1e-6) == losses.sum().item()


def test_gradcheck_with_the_coupling_as_constants():
    """float64 gradcheck with the baseline and the partners as constants. aot_unpaired's per-pair value
    is (a + b)/2 by design while its gradient is that of a + b (each sorted term appears twice): the
    checked function is losses + losses.detach(), whose value is a + b."""
    torch.manual_seed(0)
    lp_w, lp_l = (torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ref_w, ref_l = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    partners = torch.randn(5, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: bco_pair_loss(a, b, ref_w, ref_l, beta=0.7, baseline=0.3)[0], (lp_w, lp_l)
    )

    def aot(a, b, unpaired):
        losses = aot_loss(a, b, ref_w, ref_l, partners, beta=0.7, label_smoothing=0.1, unpaired=unpaired)[0]
        return losses + losses.detach() if unpaired else losses

    assert torch.autograd.gradcheck(lambda a, b: aot(a, b, False), (lp_w, lp_l))
    assert torch.autograd.gradcheck(lambda a, b: aot(a, b, True), (lp_w, lp_l))


@pytest.mark.parametrize("kind", ["bco_pair", "aot", "aot_unpaired"])
def test_finite_for_log_ratios_of_200(kind):
    """float32, log-ratios of +-200 at beta 1: losses and gradients finite (softplus, no exp)."""
    lp_w = torch.tensor([200.0, -200.0, -200.0, -200.0], requires_grad=True)
    lp_l = torch.tensor([-200.0, 200.0, 200.0, 200.0], requires_grad=True)
    zeros = torch.zeros(4)
    if kind == "bco_pair":
        losses = bco_pair_loss(lp_w, lp_l, zeros, zeros, beta=1.0, baseline=150.0)[0]
    else:
        unpaired = kind == "aot_unpaired"
        partners = aot_partners(aot_sort_values(lp_w, lp_l, zeros, zeros, unpaired=unpaired))
        losses = aot_loss(
            lp_w, lp_l, zeros, zeros, partners, beta=1.0, label_smoothing=0.0, unpaired=unpaired
        )[0]
    losses.sum().backward()
    assert torch.isfinite(losses).all() and losses.max() > 100  # the wrong-way pairs cost ~400
    assert torch.isfinite(lp_w.grad).all() and torch.isfinite(lp_l.grad).all()


# ---------------------------------------------------------------------- the exactness of the two passes
def _toy_logps(theta, features):
    """A small differentiable 'policy': summed log-probs of each response from parameters theta."""
    return torch.tanh(features @ theta).sum(-1) - 0.1 * (features @ theta).pow(2).sum(-1)


@pytest.mark.parametrize("unpaired,eps", [(False, 0.0), (True, 0.0), (False, 0.1), (True, 0.2)])
def test_two_pass_gradient_equals_the_sorted_loss_gradient(unpaired, eps):
    """12 pairs, 2 simulated ranks x 3 micro-batches of 2 pairs (positions interleaved as a packing would
    spread them): pre-pass without a graph, dist.gather_rows on each rank (a world of one here) summed as
    the all-reduce would, aot_partners, then the gradient pass with the partners as constants. Its mean
    loss and gradient equal torch.sort inside autograd on the whole batch to 1e-6 (float64)."""
    torch.manual_seed(1)
    n, dim = 12, 4
    theta = torch.randn(dim, dtype=torch.float64, requires_grad=True)
    feats_w, feats_l = (
        torch.randn(n, 3, dim, dtype=torch.float64),
        torch.randn(n, 3, dim, dtype=torch.float64),
    )
    ref_w, ref_l = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    ranks = [[[0, 5], [2, 9], [7, 11]], [[1, 3], [4, 10], [6, 8]]]  # positions of each micro-batch
    kwargs = {"beta": 0.8, "label_smoothing": eps, "unpaired": unpaired}

    gathered = torch.zeros(n, 2, dtype=torch.float64)
    for micro_batches in ranks:  # the pre-pass on each rank, then the all-reduce of gather_rows
        rows, where = [], []
        with torch.no_grad():
            for pos in micro_batches:
                p = torch.tensor(pos)
                lp = (_toy_logps(theta, feats_w[p]), _toy_logps(theta, feats_l[p]))
                rows.append(aot_sort_values(*lp, ref_w[p], ref_l[p], unpaired=unpaired))
                where.append(p)
        gathered += dist.gather_rows(torch.cat(rows), torch.cat(where), n)
    partners = aot_partners(gathered)
    total = 0.0
    for micro_batches in ranks:  # the gradient pass: a backward per micro-batch, scaled to the mean
        for pos in micro_batches:
            p = torch.tensor(pos)
            lp = (_toy_logps(theta, feats_w[p]), _toy_logps(theta, feats_l[p]))
            losses = aot_loss(*lp, ref_w[p], ref_l[p], partners[p], **kwargs)[0]
            (losses.sum() / n).backward()
            total += losses.sum().item() / n
    two_pass = theta.grad.clone()

    theta.grad = None
    lp_w, lp_l = _toy_logps(theta, feats_w), _toy_logps(theta, feats_l)
    whole = aot_sorted_loss(lp_w, lp_l, ref_w, ref_l, **kwargs) / n
    whole.backward()
    assert total == pytest.approx(whole.item(), abs=1e-6)
    torch.testing.assert_close(two_pass, theta.grad, rtol=0, atol=1e-6)
    assert theta.grad.abs().max() > 1e-3  # a gradient worth comparing


def test_gather_rows_places_rows_by_position():
    out = dist.gather_rows(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([3, 0]), 4)
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [1.0, 2.0]]))


# ----------------------------------------------------------------------------------- the reward baseline
def test_reward_baseline_is_the_mean_of_the_previous_steps_rewards():
    """0 before any step; step 0: rewards sum 3 + -1 over 2 pairs -> 2/4 = 0.5; step 1: 1 + 1 over 1 pair
    -> (2 + 2) / (4 + 2) = 2/3. The state round-trips."""
    baseline = RewardBaseline()
    assert baseline.value == 0.0
    baseline.update(3.0 + -1.0, 2 * 2)
    assert baseline.value == 0.5
    baseline.update(1.0 + 1.0, 2 * 1)
    assert baseline.value == pytest.approx(2 / 3, abs=1e-15)
    restored = RewardBaseline()
    restored.load_state_dict(json.loads(json.dumps(baseline.state_dict())))
    assert restored.value == baseline.value


# --------------------------------------------------------------------------------- objective and config
def _loss_section(**overrides):
    return dataclasses.replace(LossConfig(), **overrides)


def test_the_objective_reads_the_coupling_from_the_terms():
    bco = make_objective(_loss_section(type="bco_pair", beta=1.0), chunk_size=8)
    assert isinstance(bco, CoupledObjective) and bco.coupling == "baseline" and bco.needs_reference
    n = torch.tensor([2, 2])
    terms = PairTerms(_t(1.5, 0.0), _t(-0.5, 0.0), _t(0.0, 0.0), _t(0.0, 0.0), n, n, reward_baseline=0.5)
    assert bco.pair_loss(terms, 1.0).losses[0].item() == pytest.approx(2 * SOFTPLUS_M1, abs=1e-12)
    with pytest.raises(ValueError, match="reward_baseline"):
        bco.pair_loss(dataclasses.replace(terms, reward_baseline=None), 1.0)
    aot = make_objective(_loss_section(type="aot"), chunk_size=8)
    assert aot.coupling == "sort"
    with pytest.raises(ValueError, match="partners"):
        aot.pair_loss(terms, 1.0)
    for other in ("hdpo", "tdpo2", "simpo"):
        assert make_objective(_loss_section(type=other), chunk_size=8).coupling is None


@pytest.mark.parametrize("loss_type", ["bco_pair", "aot", "aot_unpaired"])
def test_config_accepts_the_types_and_refuses_alpha_by_name(loss_type):
    assert load_config(overrides=[*BASE, f"loss.type={loss_type}"]).loss.type == loss_type
    with pytest.raises(ConfigError, match=r"loss\.alpha: 0\.9 has no effect.*(BCO|AOT)"):
        load_config(overrides=[*BASE, f"loss.type={loss_type}", "loss.alpha=0.9"])
    with pytest.raises(ConfigError, match=r"loss\.alpha: auto"):
        load_config(overrides=[*BASE, f"loss.type={loss_type}", "loss.alpha=auto", "loss.target_entropy=1"])


def test_label_smoothing_applies_to_aot_only():
    assert (
        load_config(overrides=[*BASE, "loss.type=aot", "loss.label_smoothing=0.1"]).loss.label_smoothing
        == 0.1
    )
    with pytest.raises(
        ConfigError, match=r"loss\.label_smoothing: 0\.1 has no effect with loss.type=bco_pair"
    ):
        load_config(overrides=[*BASE, "loss.type=bco_pair", "loss.label_smoothing=0.1"])


# ------------------------------------------------------------------------------------------- real runs
def _runs(assets, loss_type, tag):
    # A reference other than the initial policy: step 0's rewards (and so bco_pair's next delta) are not 0.
    extra = [f"loss.type={loss_type}", "loss.alpha=1.0", f"reference.name_or_path={assets['ref_model']}"]
    two = launch(assets, f"{tag}2", "deepspeed", 2, extra=extra)
    one = launch(assets, f"{tag}1", "python", 2, extra=extra)
    return two, one


def _assert_same_step0(two, one):
    assert two["params"]["run.world_size"] == "2" and one["params"]["run.world_size"] == "1"
    assert two["metrics"]["loss"][0] == pytest.approx(one["metrics"]["loss"][0], rel=1e-5)
    assert_grads_close(
        torch.load(two["dir"] / "diagnostics" / "grads_step0.pt"),
        torch.load(one["dir"] / "diagnostics" / "grads_step0.pt"),
    )


@pytest.mark.distributed
def test_aot_two_ranks_match_one_process(assets):
    two, one = _runs(assets, "aot", "aot")
    _assert_same_step0(two, one)
    assert two["metrics"]["loss"][1] == pytest.approx(one["metrics"]["loss"][1], rel=1e-4)
    assert (
        all(t > 0 for t in two["metrics"]["aot/prepass_s"].values()) and "bco/baseline" not in two["metrics"]
    )


@pytest.mark.distributed
def test_bco_pair_two_ranks_match_one_process_and_resume_keeps_the_baseline(assets):
    """Step 0 trains against delta 0, step 1 against the mean of step 0's rewards (chosen and rejected:
    the mean of the two logged reward means, each over the same pairs; the reference is another model,
    so they are not 0). A run killed as step 1 starts
    and resumed from its step-1 checkpoint trains step 1 against the same delta, read from the client
    state."""
    two, one = _runs(assets, "bco_pair", "bco")
    _assert_same_step0(two, one)
    for run in (two, one):
        m = run["metrics"]
        assert m["bco/baseline"][0] == 0.0
        expected = (m["rewards/chosen"][0] + m["rewards/rejected"][0]) / 2
        assert m["bco/baseline"][1] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert abs(one["metrics"]["bco/baseline"][1]) > 1e-4  # a baseline that a lost state would change

    extra = ["loss.type=bco_pair", "loss.alpha=1.0", f"reference.name_or_path={assets['ref_model']}"]
    extra.append("train.save_every=1")
    killed = launch(
        assets,
        "bco_kill",
        "python",
        2,
        extra=extra,
        env_extra={"HDPO_FAULT_KILL_AT_STEP": "1"},
        expect_success=False,
    )
    assert killed["returncode"] == -9, killed["stderr"][-3000:]
    state = json.loads(
        (assets["root"] / "bco_kill" / "checkpoints" / "step00000001" / "client_state.json").read_text()
    )
    assert state["reward_baseline"]["count"] == 2 * PAIRS_PER_STEP  # step 0's rewards, chosen and rejected
    resumed = launch(assets, "bco_kill", "python", 2, extra=extra)
    assert "resumed from" in resumed["stderr"]
    base = resumed["metrics"]["bco/baseline"]
    assert base[1] == pytest.approx(one["metrics"]["bco/baseline"][1], rel=1e-6)
    assert resumed["metrics"]["loss"][1] == pytest.approx(one["metrics"]["loss"][1], rel=1e-5)
