"""Weighted combinations of losses, WPO's pair weights and LD-DPO's length-desensitised log-probs
(objectives/modifiers.py, objectives/objective.py CombinedObjective; docs/design.md §4): hand-worked
values, equality with the single losses and with a naive per-token reference, the config refusals, and a
2-rank run of the whole weighted family against one process and the plain-transformers math."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hdpo_ds.config import ConfigError, LossConfig, load_config, loss_label
from hdpo_ds.data.packing import MicroBatchPacking, collate
from hdpo_ds.data.tokenize import TokenizedPair
from hdpo_ds.objectives.coupled import bco_pair_loss
from hdpo_ds.objectives.logprobs import segment_sums, token_stats
from hdpo_ds.objectives.losses import preference_loss
from hdpo_ds.objectives.modifiers import ld_token_weights, sft_loss, wpo_weights
from hdpo_ds.objectives.objective import CombinedObjective, PairTerms, make_objective
from tests.run_helpers import BUDGET, PAIRS_PER_STEP, assert_grads_close, launch

BASE = ["model.name_or_path=configs/models/tiny-demo", "data.train_files=[a.jsonl]"]


def _loss(**overrides):
    return dataclasses.replace(LossConfig(), **overrides)


def _random_terms(num_pairs=6, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)

    def draw():
        return (torch.randn(num_pairs, generator=g, dtype=torch.float64) * scale - 10).requires_grad_()

    counts = torch.randint(1, 9, (num_pairs,), generator=g)
    return PairTerms(
        draw(), draw(), draw().detach(), draw().detach(), counts, counts + 1, reward_baseline=0.25
    )


# ------------------------------------------------------------------------------------------ sft and WPO
def test_sft_term_hand_worked():
    """lp_w = -6 over 3 tokens: mean NLL 2; an empty response counts one token."""
    got = sft_loss(torch.tensor([-6.0, 0.0]), torch.tensor([3, 0]))
    torch.testing.assert_close(got, torch.tensor([2.0, 0.0]))


def test_wpo_weight_hand_worked_from_token_stats():
    """One token per response, p = (0.5, 0.25, 0.25): sum p^2 = 0.375. Chosen label 1 (p 0.25):
    log(0.25 / 0.375) = log(2/3); rejected label 0 (p 0.5): log(0.5 / 0.375) = log(4/3); the weight is
    exp(log(2/3) + log(4/3)) = 8/9 = 0.8889. Both labels 0: 16/9 > 1, clamped to 1."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]] * 2, dtype=torch.float64))
    stats = token_stats(logits, torch.tensor([1, 0]), top_k=2, chunk_size=1, collision=True)
    adjusted = stats.logps - stats.log_sum_p2
    one = torch.tensor([1])
    got = wpo_weights(adjusted[:1], adjusted[1:], one, one)
    torch.testing.assert_close(got, torch.tensor([8 / 9], dtype=torch.float64), rtol=0, atol=1e-12)
    both_likely = wpo_weights(adjusted[1:], adjusted[1:], one, one)
    assert both_likely.item() == 1.0


def test_wpo_weight_is_a_per_token_mean_and_carries_no_gradient():
    """Two chosen tokens summing to 2 * log(0.5) and one rejected token at 0: exp(log 0.5 + 0) = 0.5."""
    adjusted_w = torch.tensor([2 * math.log(0.5)], requires_grad=True)
    got = wpo_weights(adjusted_w, torch.tensor([0.0]), torch.tensor([2]), torch.tensor([1]))
    assert got.item() == pytest.approx(0.5, abs=1e-7) and not got.requires_grad


# --------------------------------------------------------------------------------------------- LD-DPO
PAIRS = [
    TokenizedPair("a", [1, 5], [7, 2], [8, 9, 2], False, False),  # responses 2 and 3 tokens: l_p = 2
    TokenizedPair("b", [4], [6, 6, 6, 2], [3, 2], False, False),  # 4 and 2: l_p = 2
]


@pytest.mark.parametrize("packing", [True, False])
def test_ld_weights_hand_worked_in_both_layouts(packing):
    """Each response's first l_p tokens weigh 1, the longer one's rest ld_alpha (0.3), the rest 0."""
    batch = collate(PAIRS, MicroBatchPacking((0, 1), False, 20, 20), pad_token_id=0, packing=packing)
    got = ld_token_weights(batch.labels, batch.seq_index, batch.pair_index, 2, 0.3)
    a = 0.3
    per_sequence = [[1, 1], [1, 1, a], [1, 1, a, a], [1, 1]]  # a chosen, a rejected, b chosen, b rejected
    for seq, expected in enumerate(per_sequence):
        on = (batch.seq_index == seq) & (batch.labels != -100)
        torch.testing.assert_close(got[on], torch.tensor(expected, dtype=torch.float32))
    assert got[batch.labels == -100].abs().sum() == 0


def test_ld_sums_equal_the_naive_per_sequence_definition_and_one_is_plain():
    """log pi_ld = sum of the first l_p token log-probs + ld_alpha * the rest, sequence by sequence,
    on random log-probs; ld_alpha = 1 gives the plain sums."""
    batch = collate(PAIRS, MicroBatchPacking((0, 1), False, 20, 20), pad_token_id=0, packing=True)
    logps = torch.randn(batch.labels.shape, dtype=torch.float64)
    mask = batch.labels != -100
    for ld_alpha in (0.0, 0.4, 1.0):
        weights = ld_token_weights(batch.labels, batch.seq_index, batch.pair_index, 2, ld_alpha)
        got = segment_sums(logps * weights, batch.seq_index, 4, mask=mask).sums
        lengths = [2, 3, 4, 2]
        shorter = [2, 2, 2, 2]
        expected = []
        for seq in range(4):
            values = logps[(batch.seq_index == seq) & mask]
            assert values.numel() == lengths[seq]
            expected.append(values[: shorter[seq]].sum() + ld_alpha * values[shorter[seq] :].sum())
        torch.testing.assert_close(got, torch.stack(expected))
        if ld_alpha == 1.0:
            torch.testing.assert_close(got, segment_sums(logps, batch.seq_index, 4, mask=mask).sums)


# -------------------------------------------------------------------------------- weighted combinations
def test_a_combination_is_the_weighted_sum_of_its_terms():
    """[hdpo, bco_pair, sft] with weights (1, 0.5, 0.2) at alpha 0.8: 1 * H-DPO(alpha 0.8) + 0.5 * BCO +
    0.2 * the chosen NLL (1e-6), each unweighted term in extras; the rewards are BCO's."""
    loss = _loss(type=["hdpo", "bco_pair", "sft"], weights=[1.0, 0.5, 0.2], beta=0.3)
    objective = make_objective(loss, chunk_size=8)
    assert isinstance(objective, CombinedObjective) and objective.coupling == "baseline"
    assert objective.pair_metrics == ("loss/hdpo", "loss/bco_pair", "loss/sft")
    t = _random_terms()
    out = objective.pair_loss(t, 0.8)
    args = (t.policy_chosen, t.policy_rejected, t.reference_chosen, t.reference_rejected)
    hdpo = preference_loss(*args, loss_type="hdpo", beta=0.3, alpha=0.8).losses
    bco, bco_w, bco_l = bco_pair_loss(*args, beta=0.3, baseline=0.25)
    sft = sft_loss(t.policy_chosen, t.chosen_tokens)
    torch.testing.assert_close(out.losses, hdpo + 0.5 * bco + 0.2 * sft, rtol=1e-6, atol=1e-6)
    for name, value in (("hdpo", hdpo), ("bco_pair", bco), ("sft", sft)):
        torch.testing.assert_close(out.extras[f"loss/{name}"], value.detach())
    torch.testing.assert_close(out.chosen_rewards, bco_w)
    torch.testing.assert_close(out.rejected_rewards, bco_l)


def test_a_zero_weight_term_is_logged_but_adds_no_gradient():
    """[hdpo, sft] with weights (0, 1), the toy study's NLL-only control: the loss and its gradient are the
    chosen NLL's alone, and the H-DPO term is still logged (loss/hdpo)."""
    t = _random_terms(seed=3)
    lp_w = t.policy_chosen.detach().clone().requires_grad_(True)
    out = make_objective(_loss(type=["hdpo", "sft"], weights=[0.0, 1.0]), chunk_size=8).pair_loss(
        dataclasses.replace(t, policy_chosen=lp_w), 0.9
    )
    sft_w = t.policy_chosen.detach().clone().requires_grad_(True)
    sft = sft_loss(sft_w, t.chosen_tokens)
    torch.testing.assert_close(out.losses, sft.detach(), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.losses.sum(), lp_w)
    (expected,) = torch.autograd.grad(sft.sum(), sft_w)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    args = (t.policy_chosen, t.policy_rejected, t.reference_chosen, t.reference_rejected)
    hdpo = preference_loss(*args, loss_type="hdpo", beta=0.1, alpha=0.9).losses
    torch.testing.assert_close(out.extras["loss/hdpo"], hdpo.detach())


def test_alpha_reaches_only_the_hdpo_term_and_alpha_one_is_dpo():
    t = _random_terms(seed=1)
    args = (t.policy_chosen, t.policy_rejected, t.reference_chosen, t.reference_rejected)
    mixed = make_objective(_loss(type=["hdpo", "ipo"], beta=0.2), chunk_size=8).pair_loss(t, 0.7)
    expected = (
        preference_loss(*args, loss_type="hdpo", beta=0.2, alpha=0.7).losses
        + preference_loss(*args, loss_type="ipo", beta=0.2).losses
    )
    torch.testing.assert_close(mixed.losses, expected, rtol=1e-6, atol=1e-6)
    hdpo = make_objective(_loss(type=["hdpo", "sft"]), chunk_size=8).pair_loss(t, 1.0)
    dpo = make_objective(_loss(type=["dpo", "sft"]), chunk_size=8).pair_loss(t, 1.0)
    torch.testing.assert_close(hdpo.losses, dpo.losses, rtol=0, atol=0)


def test_combination_gradcheck_and_finite_at_log_ratios_of_200():
    objective = make_objective(_loss(type=["hdpo", "nca_pair", "sft"], weights=[1.0, 2.0, 0.5]), chunk_size=8)
    t = _random_terms(num_pairs=4, seed=2)

    def f(lp_w, lp_l):
        return objective.pair_loss(
            dataclasses.replace(t, policy_chosen=lp_w, policy_rejected=lp_l), 0.9
        ).losses

    assert torch.autograd.gradcheck(f, (t.policy_chosen, t.policy_rejected), eps=1e-6, atol=1e-7)
    for sign in (1.0, -1.0):
        big = torch.full((4,), 200.0 * sign, dtype=torch.float64, requires_grad=True)
        zeros = torch.zeros(4, dtype=torch.float64)
        terms = PairTerms(big, -big, zeros, zeros, t.chosen_tokens, t.rejected_tokens)
        out = objective.pair_loss(terms, 0.9).losses
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(big.grad).all()


def test_the_nll_terms_read_the_plain_chosen_sum_under_ld():
    """With LD-DPO the loss sees desensitised sums; sft and nll_weight read PairTerms.nll_chosen."""
    t = dataclasses.replace(_random_terms(seed=3), nll_chosen=torch.full((6,), -4.0, dtype=torch.float64))
    combo = make_objective(_loss(type=["hdpo", "sft"]), chunk_size=8).pair_loss(t, 1.0)
    torch.testing.assert_close(combo.extras["loss/sft"], 4.0 / t.chosen_tokens.double())
    single = make_objective(_loss(nll_weight=1.0), chunk_size=8).pair_loss(t, 1.0)
    plain = make_objective(_loss(), chunk_size=8).pair_loss(t, 1.0)
    torch.testing.assert_close(single.losses - plain.losses, 4.0 / t.chosen_tokens.double())


# ------------------------------------------------------------------------------------------------ config
def test_config_reads_a_list_type_from_yaml_and_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  type: [hdpo, bco_pair, sft]\n  weights: [1.0, 0.5, 0.1]\n")
    cfg = load_config(path, BASE)
    assert cfg.loss.type == ["hdpo", "bco_pair", "sft"] and cfg.loss.weights == [1.0, 0.5, 0.1]
    assert loss_label(cfg.loss) == "1*hdpo + 0.5*bco_pair + 0.1*sft"
    cfg = load_config(overrides=[*BASE, "loss.type=[hdpo,sft]", "loss.alpha=0.9"])
    assert cfg.loss.type == ["hdpo", "sft"] and loss_label(cfg.loss) == "1*hdpo + 1*sft"
    auto = [*BASE, "loss.type=[hdpo,sft]", "loss.alpha=auto", "loss.target_entropy=2"]
    assert load_config(overrides=auto).loss.alpha == "auto"
    wpo_ld = load_config(overrides=[*BASE, "loss.weighting=wpo", "loss.ld_alpha=0.5"]).loss
    assert (wpo_ld.weighting, wpo_ld.ld_alpha) == ("wpo", 0.5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["loss.type=[hdpo,sft]", "loss.nll_weight=0.1"],
            r"loss\.nll_weight: 0\.1 adds the chosen-response NLL",
        ),
        (["loss.type=[hdpo,sft]", "loss.weights=[1.0]"], r"loss\.weights: 1 weights for the 2 terms"),
        (
            ["loss.type=[hdpo,sft]", "loss.weights=[1.0,-1]"],
            r"loss\.weights\[1\]: must be a finite number >= 0",
        ),
        (["loss.type=[hdpo,sft]", "loss.weights=[0,0]"], r"loss\.weights: \[0\.0, 0\.0\] trains nothing"),
        (["loss.weights=[1.0]"], r"loss\.weights: \[1\.0\] weigh the terms of a list-valued loss\.type"),
        (["loss.type=[hdpo]"], r"loss\.type: a list names two or more terms"),
        (["loss.type=[hdpo,hdpo]"], r"loss\.type: .* names a term twice"),
        (["loss.type=[hdpo,dpo]"], r"names the same loss twice"),
        (["loss.type=[bco_pair,aot]"], r"a combination takes at most one of them"),
        (["loss.type=[hdpo,tdpo2]"], r"loss\.type\[1\]: tdpo2 is token-level"),
        (["loss.type=[simpo,sft]"], r"loss\.type\[0\]: simpo is reference-free"),
        (["loss.type=[hdpo,nope]"], r"loss\.type\[1\]: unknown term 'nope'"),
        (["loss.type=[ipo,sft]", "loss.alpha=0.9"], r"loss\.alpha: 0\.9 has no effect.*IPO regresses"),
        (["loss.type=[dpo,sft]", "loss.alpha=0.9"], r"loss\.alpha: 0\.9 has no effect"),
        (["loss.type=[ipo,hinge]", "loss.alpha=0.9"], r"no term of the combination is one of"),
        (["loss.type=[ipo,sft]", "loss.alpha=auto", "loss.target_entropy=2"], r"loss\.alpha: auto"),
        (["loss.type=[hdpo,exo_pair]"], r"loss\.label_smoothing: the exo_pair term needs"),
        (["loss.type=[ipo,sft]", "loss.f_alpha=0.3"], r"loss\.f_alpha: 0\.3 has no effect"),
        (["loss.ld_alpha=1.5"], r"loss\.ld_alpha: must lie in \[0, 1\]"),
        (["loss.ld_alpha=0.5", "reference.mode=auto"], r"reference\.mode: loss\.ld_alpha needs"),
        (["loss.type=simpo", "loss.ld_alpha=0.5"], r"loss\.ld_alpha: .*loss\.type=simpo has no reference"),
        (["loss.type=tdpo1", "loss.ld_alpha=0.5"], r"loss\.ld_alpha: .*a token-level KL term"),
        (["loss.weighting=wp0"], r"loss\.weighting: 'wp0' is not one of 'none', 'wpo'"),
    ],
)
def test_config_refuses_by_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[*BASE, *overrides])


def test_precompute_refuses_ld_alpha():
    from hdpo_ds.recipes.precompute import run_precompute

    cfg = load_config(None, [*BASE, "loss.ld_alpha=0.5"])
    with pytest.raises(ConfigError, match=r"loss\.ld_alpha: LD-DPO weighs the reference's per-token"):
        run_precompute(cfg, "/nonexistent/ds.json")  # refused before the ds_config is even read


# ------------------------------------------------------------------------------------------- real runs
WEIGHTED = [
    "loss.type=[hdpo,bco_pair,sft]",
    "loss.weights=[1.0,0.5,0.2]",
    "loss.weighting=wpo",
    "loss.ld_alpha=0.5",
]


def _weighted_step0(assets):
    """The step-0 loss with plain transformers, one sequence at a time: per pair, with LD sums
    S = sum_{t < l_p} x_t + 0.5 * sum_{t >= l_p} x_t of the policy's and the reference's token log-probs,
    1 * H-DPO(alpha 0.9, beta 0.5) + 0.5 * BCO(baseline 0) + 0.2 * the chosen mean NLL (plain sum), all
    times WPO's min(1, exp(mean_t(lp - log sum p^2)_w + mean_t(...)_l)); the mean over the step's pairs."""
    from transformers import AutoModelForCausalLM

    from hdpo_ds.data import PairSampler

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")

    policy, reference = load(assets["model"]), load(assets["ref_model"])
    pairs = assets["pairs"]
    sampler = PairSampler(
        pairs.lengths,
        pairs_per_step=PAIRS_PER_STEP,
        world_size=1,
        rank=0,
        seed=assets["seed"],
        max_tokens_per_micro_batch=BUDGET,
    )

    def tokens(model, prompt, response):
        ids = torch.tensor([list(prompt) + list(response)])
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].double(), -1)
        start = len(prompt) - 1
        logp = logp[start:]
        return logp.gather(-1, ids[0, 1:][start:, None]).squeeze(-1), (2 * logp).logsumexp(-1).detach()

    beta, alpha = 0.5, 0.9
    losses = []
    for i in sampler.assignment(0, 0).pair_indices:
        pair = pairs[int(i)]
        lp_w, c_w = tokens(policy, pair.prompt_ids, pair.chosen_ids)
        lp_l, c_l = tokens(policy, pair.prompt_ids, pair.rejected_ids)
        with torch.no_grad():
            ref_w, _ = tokens(reference, pair.prompt_ids, pair.chosen_ids)
            ref_l, _ = tokens(reference, pair.prompt_ids, pair.rejected_ids)
        short = min(len(lp_w), len(lp_l))

        def ld(x, short=short):
            return x[:short].sum() + 0.5 * x[short:].sum()

        z = alpha * beta * (ld(lp_w) - ld(lp_l)) - beta * (ld(ref_w) - ld(ref_l))
        hdpo = torch.log1p(torch.exp(-z))
        u_w, u_l = beta * (ld(lp_w) - ld(ref_w)), beta * (ld(lp_l) - ld(ref_l))
        bco = torch.log1p(torch.exp(-u_w)) + torch.log1p(torch.exp(u_l))
        sft = -lp_w.sum() / len(lp_w)
        weight = torch.exp((lp_w - c_w).detach().mean() + (lp_l - c_l).detach().mean()).clamp(max=1.0)
        losses.append(weight * (hdpo + 0.5 * bco + 0.2 * sft))
    loss = sum(losses) / len(losses)
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in policy.named_parameters()}


@pytest.mark.distributed
def test_the_weighted_family_two_ranks_match_one_process_and_the_plain_math(assets):
    """[hdpo, bco_pair, sft] with WPO and LD-DPO against a reference unlike the policy: 2 ranks (logits)
    and one process (fused head) give the same step-0 loss and gathered gradient (rtol 1e-5), and both
    equal the math above;
    the list type is a param as written, each term's loss and the WPO weight are logged."""
    extra = [*WEIGHTED, f"reference.name_or_path={assets['ref_model']}"]
    two = launch(assets, "weighted2", "deepspeed", 2, extra=[*extra, "train.fused_head=false"])
    # the one process takes policy and reference values from the fused head: WPO's log sum p^2 and
    # LD-DPO's weighted reference sums through it must give the same numbers
    one = launch(assets, "weighted1", "python", 2, extra=[*extra, "train.fused_head=true"])
    assert two["params"]["run.world_size"] == "2" and one["params"]["run.world_size"] == "1"
    assert two["params"]["run.fused_head"] == "False" and one["params"]["run.fused_head"] == "True"
    assert one["params"]["run.fused_head_reference"] == "True"
    assert two["params"]["config.loss.type"] == "['hdpo', 'bco_pair', 'sft']"
    assert two["metrics"]["loss"][0] == pytest.approx(one["metrics"]["loss"][0], rel=1e-5)
    grads_2 = torch.load(two["dir"] / "diagnostics" / "grads_step0.pt")
    assert_grads_close(grads_2, torch.load(one["dir"] / "diagnostics" / "grads_step0.pt"))
    expected_loss, expected_grads = _weighted_step0(assets)
    assert two["metrics"]["loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    assert_grads_close(grads_2, expected_grads)
    m = two["metrics"]
    for key in ("loss/hdpo", "loss/bco_pair", "loss/sft", "wpo/weight", "eval/loss/sft", "eval/wpo/weight"):
        assert key in m, sorted(m)
    weighted = m["loss/hdpo"][0] + 0.5 * m["loss/bco_pair"][0] + 0.2 * m["loss/sft"][0]
    assert 0 < m["wpo/weight"][0] <= 1 and m["loss"][0] <= weighted + 1e-6
    assert "loss: 1*hdpo + 0.5*bco_pair + 0.2*sft, weighting wpo, ld_alpha 0.5" in two["stderr"]
