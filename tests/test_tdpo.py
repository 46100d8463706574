"""TDPO: the chunked token-level KL and both losses against naive float64 computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hdpo_ds.objectives.logprobs import segment_sums, token_kl
from hdpo_ds.objectives.losses import tdpo_loss

IGNORE = -100


def naive_kl(policy, reference, labels):
    """Full-vocabulary float64 KL(p_ref || p_pol) per position, 0 where masked."""
    log_pol = torch.log_softmax(policy.double(), -1)
    log_ref = torch.log_softmax(reference.double(), -1)
    kl = (log_ref.exp() * (log_ref - log_pol)).sum(-1)
    return torch.where(labels != IGNORE, kl, torch.zeros((), dtype=torch.float64))


def _case(t=13, v=37, batch=2, seed=0, masked=0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    policy = (torch.randn(batch, t, v, generator=g, dtype=torch.float64) * 3).to(dtype)
    reference = (torch.randn(batch, t, v, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, v, (batch, t), generator=g)
    labels[torch.rand(batch, t, generator=g) < masked] = IGNORE
    return policy, reference, labels


@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 26, 1000])
def test_token_kl_matches_naive_float64(chunk):
    policy, reference, labels = _case()
    got = token_kl(policy, reference, labels, chunk_size=chunk)
    torch.testing.assert_close(got, naive_kl(policy, reference, labels), rtol=0, atol=1e-10)
    assert (got[labels == IGNORE] == 0).all() and (got[labels != IGNORE] >= -1e-12).all()


def test_token_kl_float32_and_non_contiguous_view():
    policy, reference, labels = _case(dtype=torch.float32, seed=3)
    got = token_kl(policy[:, :-1], reference[:, :-1], labels[:, 1:], chunk_size=4)
    expected = naive_kl(policy[:, :-1], reference[:, :-1], labels[:, 1:])
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_token_kl_of_identical_distributions_is_zero_and_vanishing_probabilities_stay_finite():
    policy, _, labels = _case(seed=4)
    torch.testing.assert_close(
        token_kl(policy, policy, labels), torch.zeros_like(policy[..., 0]), rtol=0, atol=1e-12
    )
    extreme = policy.clone()
    extreme[..., 0] = -1e4  # a probability of exp(-1e4): log of softmax would give -inf and NaN
    kl = token_kl(extreme.float(), policy.float(), labels, chunk_size=5)
    assert torch.isfinite(kl).all()


@pytest.mark.parametrize("chunk", [2, 5, 100])
def test_token_kl_gradient_matches_naive_autograd(chunk):
    policy, reference, labels = _case(seed=5)
    weights = torch.randn(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = policy.clone().requires_grad_()
    (token_kl(a, reference, labels, chunk_size=chunk) * weights).sum().backward()
    b = policy.clone().requires_grad_()
    (naive_kl(b, reference, labels) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_token_kl_gradcheck():
    policy, reference, labels = _case(t=4, v=11, seed=6)
    policy.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: token_kl(x, reference, labels, chunk_size=3), (policy,))


def _sequence_terms(policy, reference, labels, kl_fn, logp_fn):
    """Per-sequence summed log-probs (policy, reference) and sequential KL; sequences = batch rows."""
    rows = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(labels)
    mask = labels != IGNORE
    safe = labels.clamp(min=0)
    lp = logp_fn(policy).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    ref = logp_fn(reference).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    n = labels.shape[0]
    return (
        segment_sums(lp, rows, n, mask=mask).sums,
        segment_sums(ref, rows, n, mask=mask).sums,
        segment_sums(kl_fn(policy, reference, labels), rows, n, mask=mask).sums,
    )


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_losses_and_gradients_match_naive_float64(variant):
    """4 pairs = 8 sequences (rows 0-3 chosen, 4-7 rejected), masks, odd chunk size 3; the naive side is
    written from the formulas with a full softmax and `.detach()` for TDPO2's stop-gradient."""
    policy, reference, labels = _case(t=9, v=23, batch=8, seed=7)
    beta, alpha = 0.1, 0.5
    a = policy.clone().requires_grad_()
    lp, ref, kl = _sequence_terms(
        a,
        reference,
        labels,
        lambda p, r, y: token_kl(p, r, y, chunk_size=3),
        lambda x: torch.log_softmax(x, -1),
    )
    out = tdpo_loss(
        lp[:4], lp[4:], ref[:4], ref[4:], kl[:4], kl[4:], loss_type=variant, beta=beta, tdpo_alpha=alpha
    )
    out.losses.sum().backward()

    b = policy.clone().requires_grad_()
    lp_n, ref_n, kl_n = _sequence_terms(
        b, reference, labels, naive_kl, lambda x: torch.log_softmax(x.double(), -1)
    )
    u = (lp_n[:4] - ref_n[:4]) - (lp_n[4:] - ref_n[4:])
    if variant == "tdpo1":
        z = beta * (u - (kl_n[4:] - kl_n[:4]))
    else:
        z = beta * (u - alpha * (kl_n[4:] - kl_n[:4].detach()))
    naive = -F.logsigmoid(z)
    naive.sum().backward()
    torch.testing.assert_close(out.losses, naive, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.chosen_kl, kl_n[:4].detach(), rtol=0, atol=1e-10)


def test_tdpo2_stops_the_gradient_of_the_chosen_kl():
    vals = [
        torch.tensor([v], dtype=torch.float64, requires_grad=True)
        for v in (-10.0, -12.0, -11.0, -11.0, 0.3, 0.7)
    ]
    two = tdpo_loss(*vals, loss_type="tdpo2")
    g_w, g_l = torch.autograd.grad(two.losses.sum(), [vals[4], vals[5]], allow_unused=True)
    assert g_w is None and g_l.item() != 0.0  # the chosen KL is a constant in TDPO2
    one = tdpo_loss(*vals, loss_type="tdpo1")
    g_w, g_l = torch.autograd.grad(one.losses.sum(), [vals[4], vals[5]])
    assert g_w.item() != 0.0 and g_w.item() == pytest.approx(-g_l.item())


def test_tdpo_worked_example():
    """lp_w=-10, lp_l=-12, ref_w=ref_l=-11: U = 1 - (-1) = 2; KL_w = 0.3, KL_l = 0.7, beta = 0.1.
    TDPO1: z = 0.1 * (2 - 0.4) = 0.16, loss = ln(1 + e^-0.16) = 0.6156856.
    TDPO2 (alpha 0.5): z = 0.1 * (2 - 0.5 * 0.4) = 0.18, loss = ln(1 + e^-0.18) = 0.6071917."""
    vals = [torch.tensor([v], dtype=torch.float64) for v in (-10.0, -12.0, -11.0, -11.0, 0.3, 0.7)]
    one = tdpo_loss(*vals, loss_type="tdpo1", beta=0.1)
    two = tdpo_loss(*vals, loss_type="tdpo2", beta=0.1, tdpo_alpha=0.5)
    assert one.losses.item() == pytest.approx(math.log1p(math.exp(-0.16)), abs=1e-12)
    assert two.losses.item() == pytest.approx(math.log1p(math.exp(-0.18)), abs=1e-12)
    assert one.chosen_rewards.item() == pytest.approx(0.1) and one.rejected_rewards.item() == pytest.approx(
        -0.1
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"beta": 0}, "beta"), ({"tdpo_alpha": -1}, "tdpo_alpha"), ({"loss_type": "tdpo3"}, "tdpo3")],
)
def test_tdpo_bad_arguments(kwargs, name):
    vals = [torch.zeros(2) for _ in range(6)]
    with pytest.raises(ValueError, match=name):
        tdpo_loss(*vals, **kwargs)


def _tdpo2_step0(assets):
    """The step-0 global batch of TDPO2 with plain transformers, one sequence at a time, full softmaxes in
    float64: (loss, mean chosen KL, mean KL margin, the policy's gradient)."""
    from transformers import AutoModelForCausalLM

    from hdpo_ds.data import PairSampler
    from tests.run_helpers import BUDGET, PAIRS_PER_STEP

    policy = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(assets["ref_model"], dtype=torch.float32).eval()
    pairs = assets["pairs"]
    indices = (
        PairSampler(
            pairs.lengths,
            pairs_per_step=PAIRS_PER_STEP,
            world_size=1,
            rank=0,
            seed=assets["seed"],
            max_tokens_per_micro_batch=BUDGET,
        )
        .assignment(0, 0)
        .pair_indices
    )

    def terms(prompt, response):
        ids = torch.tensor([list(prompt) + list(response)])
        start = len(prompt) - 1
        log_pol = torch.log_softmax(policy(input_ids=ids).logits[0, :-1].double(), -1)[start:]
        with torch.no_grad():
            log_ref = torch.log_softmax(reference(input_ids=ids).logits[0, :-1].double(), -1)[start:]
        target = ids[0, 1:][start:, None]
        kl = (log_ref.exp() * (log_ref - log_pol)).sum()
        return log_pol.gather(-1, target).sum(), log_ref.gather(-1, target).sum(), kl

    # TDPO2 as Zeng et al. write it (hdpo_ds/objectives/losses.py), pair by pair in float64:
    # U = (lp_w - ref_w) - (lp_l - ref_l), loss = -log sigmoid(beta * (U - alpha * (KL_l - sg(KL_w))))
    # = log(1 + e^-z).
    beta, alpha = 0.5, 0.5
    losses, kl_chosen, kl_margin = [], [], []
    for i in indices:
        pair = pairs[int(i)]
        lp_w, ref_w, kl_w = terms(pair.prompt_ids, pair.chosen_ids)
        lp_l, ref_l, kl_l = terms(pair.prompt_ids, pair.rejected_ids)
        assert kl_w > 0 and kl_l > 0  # the KL term is really there
        z = beta * (((lp_w - ref_w) - (lp_l - ref_l)) - alpha * (kl_l - kl_w.detach()))
        losses.append(torch.log1p(torch.exp(-z)))
        kl_chosen.append(float(kl_w.detach()))
        kl_margin.append(float((kl_l - kl_w).detach()))
    loss = sum(losses) / len(losses)
    loss.backward()
    grads = {n: p.grad.float() for n, p in policy.named_parameters()}
    return loss.item(), sum(kl_chosen) / len(kl_chosen), sum(kl_margin) / len(kl_margin), grads


TDPO2_RUN = [
    "loss.type=tdpo2",
    "loss.alpha=1.0",
    "loss.beta=0.5",
    "train.export_hf=false",
]


@pytest.mark.distributed
@pytest.mark.parametrize("fused_head", [False, True], ids=["logits", "fused_head"])
def test_two_rank_tdpo2_step0_equals_single_process(assets, fused_head):
    """A 2-rank ZeRO-3 run (unequal pairs, a filler; persistence threshold 0, so both lm_heads are
    partitioned) with a reference unlike the policy: its step-0 loss and KL metrics equal the step's pairs
    computed one sequence at a time with full softmaxes (1e-5). Through the fused head (both heads chunked
    together, no logits of either model) the full gathered gradient equals that math's too."""
    from tests.run_helpers import assert_grads_close, launch

    extra = [*TDPO2_RUN, f"reference.name_or_path={assets['ref_model']}"]
    extra.append("train.fused_head=true" if fused_head else "train.dump_gradients_at=[]")
    run = launch(assets, f"tdpo2_{'fused' if fused_head else 'logits'}", "deepspeed", 1, extra=extra)
    assert run["params"]["config.loss.type"] == "tdpo2"
    assert run["params"]["run.fused_head"] == str(fused_head)
    assert run["params"]["run.fused_head_reference"] == str(fused_head)
    loss, kl_chosen, kl_margin, grads = _tdpo2_step0(assets)
    assert run["metrics"]["loss"][0] == pytest.approx(loss, rel=1e-5)
    assert run["metrics"]["kl/chosen"][0] == pytest.approx(kl_chosen, rel=1e-5)
    assert run["metrics"]["kl/margin"][0] == pytest.approx(kl_margin, rel=1e-4)
    if fused_head:
        assert_grads_close(torch.load(run["dir"] / "diagnostics" / "grads_step0.pt"), grads)


def test_tdpo_refuses_the_cache_at_start_up():
    from hdpo_ds.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match="reference.mode: loss.type=tdpo2 needs the reference's full next-token"
    ):
        load_config(
            None,
            [
                "model.name_or_path=m",
                "data.train_files=[a]",
                "loss.type=tdpo2",
                "reference.mode=cached",
                "reference.cache_path=/x",
            ],
        )
