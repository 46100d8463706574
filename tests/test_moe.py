"""Mixture-of-experts policies: the router's load-balancing loss (objectives/router.py) against a hand-worked
value and the model's own computation, and a 2-rank ZeRO-3 run whose step-0 loss (router term included) and
gathered gradient equal one process running the same micro-batches."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from hdpo_ds.objectives.router import router_stats
from tests.run_helpers import BUDGET, PAIRS_PER_STEP, ROOT, assert_grads_close, launch

TINY_MOE = os.path.join(ROOT, "configs/models/tiny-moe")


def _tiny_moe(vocab_size: int, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY_MOE)
    config.vocab_size = vocab_size
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def test_hand_worked_two_experts_top1():
    """E = 2, top-1, one layer, tokens with router probabilities (0.8, 0.2) and (0.4, 0.6): f = (1/2, 1/2),
    P = (0.6, 0.4), aux = 2 * (0.5 * 0.6 + 0.5 * 0.4) = 1; a masked third token changes nothing."""
    p = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.99, 0.01]], dtype=torch.float64)
    out = router_stats((p.log(),), top_k=1, token_mask=torch.tensor([True, True, False]))
    assert out.aux.item() == pytest.approx(1.0, abs=1e-6)
    assert out.counts.tolist() == [[1.0, 1.0]]
    # all three tokens: f = (2/3, 1/3), P = (2.19/3, 0.81/3): aux = 2 * (2 * 2.19 + 0.81) / 9
    full = router_stats((p.log(),), top_k=1)
    assert full.aux.item() == pytest.approx(2 * (2 * 2.19 + 0.81) / 9, abs=1e-6)


def test_equals_the_models_own_aux_loss_and_its_gradient():
    """router_stats on the model's router logits equals the aux_loss Mixtral computes itself (with and
    without an attention mask that hides padding), value and gradient."""
    model = _tiny_moe(512)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 512, (2, 17), generator=g)
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, 11:] = 0
    for attention_mask in (mask, None):
        out = model(input_ids=ids, attention_mask=attention_mask, output_router_logits=True)
        ours = router_stats(out.router_logits, 2, attention_mask)
        torch.testing.assert_close(ours.aux, out.aux_loss, rtol=1e-6, atol=0)
        want = torch.autograd.grad(out.aux_loss, model.model.layers[0].mlp.gate.weight, retain_graph=True)[0]
        got = torch.autograd.grad(ours.aux, model.model.layers[0].mlp.gate.weight)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
        tokens = int(mask.sum()) if attention_mask is not None else ids.numel()
        assert ours.counts.shape == (2, 4) and ours.counts.sum(dim=1).tolist() == [2.0 * tokens] * 2


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        router_stats((torch.zeros(3, 4),), top_k=5)
    with pytest.raises(ValueError, match="token_mask"):
        router_stats((torch.zeros(3, 4),), top_k=1, token_mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty"):
        router_stats((), top_k=1)


def test_sparse_blocks_become_zero3_leaves(assets):
    """moe_blocks finds Mixtral's sparse block (router + stacked experts) and nothing in a dense Llama;
    model.moe_leaf_modules marks it under ZeRO-3 only, and true is refused for a dense model."""
    from deepspeed.utils import z3_leaf_module
    from transformers import AutoModelForCausalLM

    from hdpo_ds.config import ConfigError
    from hdpo_ds.runtime.engine import mark_moe_leaves, moe_blocks

    moe, dense = _tiny_moe(512), AutoModelForCausalLM.from_pretrained(assets["model"])
    assert [c.__name__ for c in moe_blocks(moe)] == ["MixtralSparseMoeBlock"] and moe_blocks(dense) == []
    zero3, zero2 = {"zero_optimization": {"stage": 3}}, {"zero_optimization": {"stage": 2}}
    assert mark_moe_leaves(moe, zero2, True) == [] and not z3_leaf_module(moe.model.layers[0].mlp)
    assert mark_moe_leaves(moe, zero3, False) == [] and not z3_leaf_module(moe.model.layers[0].mlp)
    assert mark_moe_leaves(moe, zero3, True) == ["MixtralSparseMoeBlock"]
    assert all(z3_leaf_module(layer.mlp) for layer in moe.model.layers)
    assert mark_moe_leaves(dense, zero3, False) == []
    with pytest.raises(ConfigError, match="model.moe_leaf_modules: true"):
        mark_moe_leaves(dense, zero3, True)
    from hdpo_ds.config import load_config
    from hdpo_ds.recipes.preference import check_before_engines

    base = [f"model.name_or_path={assets['model']}", f"data.train_files=[{assets['train']}]", "output_dir=o"]
    with pytest.raises(ConfigError, match="model.moe_leaf_modules: true, but .* is not a mixture"):
        check_before_engines(load_config(None, [*base, "model.moe_leaf_modules=true"]))


def test_config_refuses_a_coefficient_for_a_dense_model_and_a_bad_value(assets):
    from hdpo_ds.config import ConfigError, load_config
    from hdpo_ds.recipes.preference import check_before_engines

    base = [f"model.name_or_path={assets['model']}", f"data.train_files=[{assets['train']}]", "output_dir=o"]
    with pytest.raises(ConfigError, match="model.router_aux_loss_coef: must be"):
        load_config(None, [*base, "model.router_aux_loss_coef=-1"])
    cfg = load_config(None, [*base, "model.router_aux_loss_coef=0.01"])
    with pytest.raises(ConfigError, match="model.router_aux_loss_coef: .* is not a mixture-of-experts"):
        check_before_engines(cfg)


def _moe_step0(model_dir, assets, coef):
    """The step-0 objective in one process: H-DPO (beta 0.5, alpha 0.9, the reference the policy's initial
    copy) one sequence at a time, plus coef * sum over the 2-rank plan's micro-batches of (its share of the
    step's tokens) * (router loss over its sequences' tokens). Returns (loss, gradient by name)."""
    from transformers import AutoModelForCausalLM

    from hdpo_ds.data import PairSampler

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = assets["pairs"]
    assignment = PairSampler(
        pairs.lengths,
        pairs_per_step=PAIRS_PER_STEP,
        world_size=2,
        rank=0,
        seed=assets["seed"],
        max_tokens_per_micro_batch=BUDGET,
    ).assignment(0, 0)
    micro_batches = [mb for rank in assignment.packed.ranks for mb in rank if not mb.filler]
    step_tokens = sum(mb.tokens for mb in micro_batches)
    beta, alpha = 0.5, 0.9
    pair_losses, router_terms = [], []
    for mb in micro_batches:
        routers = []
        for pos in mb.pairs:
            pair = pairs[int(assignment.pair_indices[pos])]
            sides = []
            for response in (pair.chosen_ids, pair.rejected_ids):
                ids = torch.tensor([list(pair.prompt_ids) + list(response)])
                out = model(input_ids=ids, output_router_logits=True, use_cache=False)
                routers.append(out.router_logits)
                logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
                start = len(pair.prompt_ids) - 1
                sides.append(logp[start:].gather(-1, ids[0, 1:][start:, None]).sum())
            chosen, rejected = sides
            z = alpha * beta * (chosen - rejected) - beta * (chosen.detach() - rejected.detach())
            pair_losses.append(torch.log1p(torch.exp(-z)))
        layers = tuple(torch.cat([r[i] for r in routers]) for i in range(len(routers[0])))
        tokens = layers[0].shape[0]
        assert tokens == mb.tokens
        router_terms.append(router_stats(layers, 2).aux * (tokens / step_tokens))
    loss = sum(pair_losses) / len(pair_losses) + coef * sum(router_terms)
    loss.backward()
    aux = float(sum(t.detach() for t in router_terms))
    return loss.item(), aux, {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.distributed
def test_two_rank_zero3_moe_step0_equals_one_process(assets, tmp_path):
    """The tiny Mixtral (4 experts, top-2) on 2 ranks of ZeRO-3 (persistence threshold 0, every expert
    tensor partitioned; the sparse blocks leaves, model.moe_leaf_modules), router loss weight 0.5 so
    that it shows: step-0 loss, moe/aux_loss and the full gathered gradient equal the one-process
    computation over the same micro-batches (rtol 1e-5). The run goes on to step 1 with a checkpoint after
    each step; resumed after step 0 with the reference cached instead (reference.mode=auto computes it
    first), it ends with the same weights."""
    model_dir = tmp_path / "moe"
    model = _tiny_moe(len(assets["tokenizer"]))
    model.save_pretrained(model_dir)
    assets["tokenizer"].save_pretrained(model_dir)
    coef = 0.5
    moe = [
        f"model.name_or_path={model_dir}",
        f"model.router_aux_loss_coef={coef}",
        "model.moe_leaf_modules=true",
    ]
    run = launch(assets, "moe2", "deepspeed", 2, extra=[*moe, "train.save_every=1"])
    loss, aux, grads = _moe_step0(model_dir, assets, coef)
    metrics = run["metrics"]
    assert metrics["moe/aux_weight"][0] == coef
    assert metrics["moe/aux_loss"][0] == pytest.approx(aux, rel=1e-5)
    assert metrics["loss"][0] == pytest.approx(loss, rel=1e-5)
    assert 1.0 <= metrics["moe/load_max_over_mean"][0] <= 4.0
    assert math.isfinite(metrics["moe/load_max_over_mean/layer1"][0])
    assert_grads_close(torch.load(run["dir"] / "diagnostics" / "grads_step0.pt"), grads)
    assert run["params"]["run.moe_leaf_modules"] == "MixtralSparseMoeBlock"
    first = run["dir"] / "checkpoints" / "step00000001"
    resumed = launch(
        assets,
        "moe2_resumed",
        "deepspeed",
        2,
        extra=[*moe, f"train.resume={first}", "reference.mode=auto", "train.dump_gradients_at=[]"],
    )
    assert "resumed from" in resumed["stderr"] and "reference: cached values" in resumed["stderr"]
    from safetensors.torch import load_file

    got = load_file(str(resumed["dir"] / "hf" / "model.safetensors"))
    expected = load_file(str(run["dir"] / "hf" / "model.safetensors"))
    assert set(got) == set(expected)
    # the cached sums (float64) differ from the online ones (float32) by ~1e-7 relative; Adam can turn that
    # into ~1e-7 on a weight whose gradient is near 0: 1e-6 is a thousandth of one step (lr 1e-3)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert json.loads((run["dir"] / "run_info.json").read_text())["run_id"]
