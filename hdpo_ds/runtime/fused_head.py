"""The policy forward without the full logits: the decoder's hidden states, then the fused head.

`policy_token_stats` runs the model through its engine (so DeepSpeed's forward and its backward hooks
run as usual) with `logits_to_keep` an empty index, which makes the Hugging Face model apply lm_head
to no token at all, and `output_hidden_states=True`; the last hidden state is the decoder's output after
its final norm. It then calls `objectives/fused_head.fused_token_stats` *as the forward of the model's
output-embedding module*: under ZeRO-3 the hooks on that module gather its (partitioned) weight, and
bias, for the forward, and again before its backward, and the gradient `fused_token_stats` returns for
the weight goes to DeepSpeed like lm_head's own (for tied embeddings the weight is the input
embedding's parameter, whose gradient then sums both uses). Nothing else of the model is gathered.
TDPO (`policy_token_stats_kl`) runs the reference's decoder alone and copies its output embedding while
that module's hooks hold it gathered (`reference_head_inputs`): the policy's backward recomputes the
reference's chunk logits, long after the reference's forward has released its parameters.
"""

from __future__ import annotations

import torch

from hdpo_ds.objectives.fused_head import FusedKL, fused_token_logps, fused_token_stats, fused_token_stats_kl
from hdpo_ds.objectives.logprobs import TokenStats

__all__ = [
    "FUSED_HEAD_MIN_VOCAB",
    "FUSED_HEAD_MODEL_TYPES",
    "head_transform",
    "policy_token_stats",
    "policy_token_stats_kl",
    "reference_head_inputs",
    "reference_token_logps",
    "use_fused_head",
]

# model_type -> how its forward turns lm_head's output into logits: (scale attribute, softcap attribute,
# whether the scale divides). Only model types whose head is exactly this are fused; tests check each
# against the model's own logits (tests/test_fused_head_model.py).
FUSED_HEAD_MODEL_TYPES: dict[str, tuple[str | None, str | None, bool]] = {
    "llama": (None, None, False),
    "mistral": (None, None, False),
    "qwen2": (None, None, False),
    "cohere": ("logit_scale", None, False),  # logits * logit_scale
    "gemma2": (None, "final_logit_softcapping", False),  # c * tanh(logits / c)
    "granite": ("logits_scaling", None, True),  # logits / logits_scaling
}

# `train.fused_head: auto` fuses from this vocabulary size on: the logits and their gradient cost 8 bytes
# per token and entry in float32 (8 GiB at 8,192 tokens and V = 128,256), while the fused head costs one
# extra T x H x V product in the backward. Below it (Llama-2, Mistral: 32,000) the logits are a few GiB
# at most and the recomputation is not worth it (docs/design.md §4).
FUSED_HEAD_MIN_VOCAB = 100_000


def head_transform(model_config) -> tuple[float, float | None] | None:
    """(logit_scale, softcap) of the model's logits, or None when its model type is not one the fused
    head reproduces exactly (FUSED_HEAD_MODEL_TYPES)."""
    spec = FUSED_HEAD_MODEL_TYPES.get(getattr(model_config, "model_type", None))
    if spec is None:
        return None
    scale_attr, cap_attr, divides = spec
    scale = 1.0
    if scale_attr is not None:
        value = float(getattr(model_config, scale_attr))
        scale = 1.0 / value if divides else value
    cap = getattr(model_config, cap_attr, None) if cap_attr is not None else None
    return scale, (float(cap) if cap else None)


def use_fused_head(setting, model_config) -> bool:
    """train.fused_head for one model: True / False as set (True for a model type the fused head does
    not know is refused before any engine, recipes/preference.py), auto: a known model type with a
    vocabulary of at least FUSED_HEAD_MIN_VOCAB."""
    if setting != "auto":
        return bool(setting)
    return model_config.vocab_size >= FUSED_HEAD_MIN_VOCAB and head_transform(model_config) is not None


def _transform(model) -> tuple[float, float | None]:
    transform = head_transform(model.config)
    if transform is None:
        raise ValueError(f"the fused head does not know model_type {model.config.model_type!r}")
    return transform


def _run_as_head(model: torch.nn.Module, hidden: torch.Tensor, compute):
    """compute(h, weight, bias) as the forward of the model's output-embedding module: ZeRO-3's hooks on
    that module gather its parameters around the call (and again before its backward)."""
    head = model.get_output_embeddings()
    head.forward = lambda h: compute(h, head.weight, head.bias)
    try:
        return head(hidden)
    finally:
        del head.forward  # the class's forward again


@torch.no_grad()
def reference_token_logps(
    model: torch.nn.Module, inputs: dict, labels: torch.Tensor, *, chunk_size: int
) -> torch.Tensor:
    """token_logps(model(**inputs).logits, labels) without the logits, for the reference engine and the
    precompute pass: the decoder alone (no backward, so DeepSpeed's engine forward is not needed, and
    no per-layer hidden states are kept), then `fused_token_logps` as the output embedding's forward."""
    logit_scale, softcap = _transform(model)
    hidden = model.get_decoder()(**inputs).last_hidden_state
    return _run_as_head(
        model,
        hidden,
        lambda h, weight, bias: fused_token_logps(
            h, weight, labels, bias=bias, logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size
        ),
    )


def _policy_hidden(call, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden state through `call` (the engine), with lm_head applied to no token."""
    empty = torch.empty(0, dtype=torch.long, device=labels.device)
    return call(**inputs, logits_to_keep=empty, output_hidden_states=True).hidden_states[-1]


def policy_token_stats(
    call,
    model: torch.nn.Module,
    inputs: dict,
    labels: torch.Tensor,
    *,
    top_k: int,
    chunk_size: int,
    collision: bool = False,
) -> TokenStats:
    """TokenStats of one micro-batch, as token_stats(model(**inputs).logits, labels) would give.

    Args:
        call: what runs the forward: the DeepSpeed engine (its forward registers the backward hooks
            ZeRO needs) or the model itself.
        model: the Hugging Face causal LM (`engine.module`), whose config and output embedding are read.
        inputs: the model's keyword inputs (`PackedBatch.model_inputs()`).
        labels: (B, T), already shifted, -100 outside the response tokens.
    """
    logit_scale, softcap = _transform(model)
    hidden = _policy_hidden(call, inputs, labels)

    def compute(h, weight, bias):
        stats = fused_token_stats(
            h,
            weight,
            labels,
            bias=bias,
            logit_scale=logit_scale,
            softcap=softcap,
            top_k=top_k,
            chunk_size=chunk_size,
            collision=collision,
        )
        # a plain tuple of tensors: ZeRO-3 walks tuples when it hooks a module's outputs
        return tuple(s for s in stats if s is not None)

    out = _run_as_head(model, hidden, compute)
    return TokenStats(*out[:4], out[4] if collision else None)


@torch.no_grad()
def reference_head_inputs(model: torch.nn.Module, inputs: dict) -> tuple:
    """What TDPO's fused pass needs of the reference: (hidden (B, T, H), weight (V, H), bias or None,
    logit_scale, softcap). The decoder alone runs; the output embedding's weight (and bias) are copied
    while its ZeRO-3 hooks hold them gathered, because the policy's backward recomputes the reference's
    chunk logits: one (V, H) copy lives from this forward to that backward, never the logits."""
    logit_scale, softcap = _transform(model)
    hidden = model.get_decoder()(**inputs).last_hidden_state

    def copy(h, weight, bias):
        return (weight.detach().clone(), *(() if bias is None else (bias.detach().clone(),)))

    weight, *bias = _run_as_head(model, hidden, copy)
    return hidden, weight, bias[0] if bias else None, logit_scale, softcap


def policy_token_stats_kl(
    call,
    model: torch.nn.Module,
    inputs: dict,
    labels: torch.Tensor,
    reference: tuple,
    *,
    top_k: int,
    chunk_size: int,
    collision: bool = False,
) -> FusedKL:
    """`policy_token_stats` plus TDPO's token KL(ref || policy) and the reference's label log-probs, both
    heads chunked together (objectives/fused_head.py `fused_token_stats_kl`); `reference` is what
    `reference_head_inputs` returned for the same micro-batch. Arguments otherwise as there."""
    logit_scale, softcap = _transform(model)
    ref_hidden, ref_weight, ref_bias, ref_scale, ref_softcap = reference
    hidden = _policy_hidden(call, inputs, labels)

    def compute(h, weight, bias):
        res = fused_token_stats_kl(
            h,
            weight,
            ref_hidden,
            ref_weight,
            labels,
            bias=bias,
            reference_bias=ref_bias,
            logit_scale=logit_scale,
            softcap=softcap,
            reference_logit_scale=ref_scale,
            reference_softcap=ref_softcap,
            top_k=top_k,
            chunk_size=chunk_size,
            collision=collision,
        )
        stats = tuple(s for s in res.stats if s is not None)
        return (*stats, res.kl, res.reference_logps)  # a plain tuple: ZeRO-3 hooks walk tuples

    out = _run_as_head(model, hidden, compute)
    n = 5 if collision else 4
    return FusedKL(TokenStats(*out[:4], out[4] if collision else None), out[n], out[n + 1])
