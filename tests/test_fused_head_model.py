"""The fused head wired into a real model: `policy_token_stats` against token_stats on the model's own
logits (every model type the fused head claims, tied embeddings included), the config refusals, and
2 ranks of ZeRO-3 against the single-process logits path."""

from __future__ import annotations

import pytest
import torch

from hdpo_ds.config import ConfigError, load_config
from hdpo_ds.objectives.logprobs import token_logps, token_stats
from hdpo_ds.runtime.fused_head import (
    FUSED_HEAD_MODEL_TYPES,
    head_transform,
    policy_token_stats,
    reference_token_logps,
)
from tests.run_helpers import assert_grads_close, launch

SMALL = {
    "vocab_size": 61,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}
MODELS = {
    "llama": ("LlamaConfig", {}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "cohere": ("CohereConfig", {"logit_scale": 0.0625, "tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 3.0, "head_dim": 8}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
}


def _model(name):
    import transformers

    cls_name, extra = MODELS[name]
    config = getattr(transformers, cls_name)(**SMALL, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def test_every_claimed_model_type_is_tested():
    assert {MODELS[name][0].removesuffix("Config").lower() for name in MODELS} == set(FUSED_HEAD_MODEL_TYPES)


@pytest.mark.parametrize("name", list(MODELS))
def test_policy_token_stats_equal_the_logits_path(name):
    """Values rtol 1e-5, and the gradient of every parameter (lm_head or the tied embedding included)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    labels[:, :3] = -100  # the prompt
    weights = torch.linspace(-1.0, 2.0, labels.numel()).view(labels.shape)
    results = []
    for fused in (True, False):
        model = _model(name)
        if fused:
            stats = policy_token_stats(
                model, model, {"input_ids": ids}, labels, top_k=5, chunk_size=4, collision=True
            )
        else:
            stats = token_stats(model(input_ids=ids).logits, labels, top_k=5, chunk_size=4, collision=True)
        (stats.logps * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((stats, grads))
    (fused_stats, fused_grads), (ref_stats, ref_grads) = results
    for field in ("logps", "entropy", "topk_mass", "topk_entropy", "log_sum_p2"):
        torch.testing.assert_close(
            getattr(fused_stats, field), getattr(ref_stats, field), rtol=1e-5, atol=1e-6
        )
    assert_grads_close(fused_grads, ref_grads)
    assert "forward" not in vars(_model(name).get_output_embeddings())  # the class's forward is back


@pytest.mark.parametrize("name", list(MODELS))
def test_reference_token_logps_equal_the_logits_path(name):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    labels[:, :2] = -100
    model = _model(name).eval()
    got = reference_token_logps(model, {"input_ids": ids}, labels, chunk_size=3)
    with torch.no_grad():
        want = token_logps(model(input_ids=ids).logits, labels, chunk_size=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got[labels == -100] == 0).all() and (got[labels != -100] < 0).all()


def test_head_transform_reads_the_model_configs():
    assert head_transform(_model("cohere").config) == (0.0625, None)
    assert head_transform(_model("gemma2").config) == (1.0, 3.0)
    assert head_transform(_model("granite").config) == (0.25, None)
    assert head_transform(_model("llama").config) == (1.0, None)
    from transformers import GPT2Config

    assert head_transform(GPT2Config()) is None


def test_config_refuses_what_is_not_a_setting():
    with pytest.raises(ConfigError, match="train.fused_head"):
        load_config(None, ["train.fused_head=maybe"])


def test_config_accepts_the_wired_paths():
    base = ["model.name_or_path=m", "data.train_files=[t.jsonl]", "output_dir=o"]
    assert (
        load_config(
            None, [*base, "train.fused_head=true", "reference.mode=cached", "reference.cache_path=c"]
        ).train.fused_head
        is True
    )
    assert load_config(None, [*base, "train.fused_head=true", "loss.type=simpo"]).train.fused_head is True
    assert load_config(None, [*base, "train.fused_head=true"]).train.fused_head is True  # online reference
    assert load_config(None, [*base, "train.fused_head=true", "loss.type=tdpo2"]).train.fused_head is True
    assert load_config(None, base).train.fused_head == "auto"


@pytest.mark.distributed
def test_two_rank_zero3_fused_online_step0_equals_single_process_logits_path(assets):
    """hdpo with the online reference, 2 ranks of ZeRO-3 (persistence threshold 0: lm_head is
    partitioned), both models through the fused head: step-0 loss and full gathered gradient equal the
    plain-transformers logits math."""
    from tests.test_trainer import _single_process_step0

    run = launch(assets, "fused2_online", "deepspeed", 1, extra=["train.fused_head=true"])
    assert run["params"]["run.fused_head"] == "True" and run["params"]["run.fused_head_reference"] == "True"
    assert run["params"]["run.world_size"] == "2"
    expected_loss, expected_grads = _single_process_step0(assets)
    assert run["metrics"]["loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    assert_grads_close(torch.load(run["dir"] / "diagnostics" / "grads_step0.pt"), expected_grads)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_zero3_fused_step0_equals_single_process_logits_path(assets):
    """The precompute pass (one process) through the fused head, then hdpo from that cached reference on
    2 ranks of ZeRO-3 with the fused head: step-0 loss and full gathered gradient equal the logits math."""
    from tests.test_trainer import _single_process_step0

    cache = assets["root"] / "fused_cache"
    pre = launch(
        assets,
        "fused_pre",
        "python",
        1,
        extra=[f"reference.cache_path={cache}", "train.fused_head=true"],
        script="launch/precompute_ref.py",
    )
    assert pre["returncode"] == 0 and "through the fused head" in pre["stderr"]
    run = launch(
        assets,
        "fused2",
        "deepspeed",
        1,
        extra=["train.fused_head=true", "reference.mode=cached", f"reference.cache_path={cache}"],
    )
    assert run["params"]["run.fused_head"] == "True" and run["params"]["run.world_size"] == "2"
    expected_loss, expected_grads = _single_process_step0(assets)
    assert run["metrics"]["loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    assert_grads_close(torch.load(run["dir"] / "diagnostics" / "grads_step0.pt"), expected_grads)
