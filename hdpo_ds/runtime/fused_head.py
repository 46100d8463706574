"""The policy forward without the full logits: the decoder's hidden states, then the fused head.

`policy_token_stats` runs the model through its engine (so DeepSpeed's forward and its backward hooks
run as usual) with `logits_to_keep` an empty index, which makes the Hugging Face model apply lm_head
to no token at all, and `output_hidden_states=True`; the last hidden state is the decoder's output after
its final norm. It then calls `objectives/fused_head.fused_token_stats` *as the forward of the model's
output-embedding module*: under ZeRO-3 the hooks on that module gather its (partitioned) weight, and
bias, for the forward, and again before its backward, and the gradient `fused_token_stats` returns for
the weight goes to DeepSpeed like lm_head's own (for tied embeddings the weight is the input
embedding's parameter, whose gradient then sums both uses). Nothing else of the model is gathered.
"""

from __future__ import annotations

import torch

from hdpo_ds.objectives.fused_head import FusedTokenStats, fused_token_stats

__all__ = ["FUSED_HEAD_MIN_VOCAB", "FUSED_HEAD_MODEL_TYPES", "head_transform", "policy_token_stats"]

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


def policy_token_stats(
    call, model: torch.nn.Module, inputs: dict, labels: torch.Tensor, *, top_k: int, chunk_size: int
) -> FusedTokenStats:
    """FusedTokenStats of one micro-batch, as token_stats(model(**inputs).logits, labels) would give.

    Args:
        call: what runs the forward: the DeepSpeed engine (its forward registers the backward hooks
            ZeRO needs) or the model itself.
        model: the Hugging Face causal LM (`engine.module`), whose config and output embedding are read.
        inputs: the model's keyword inputs (`PackedBatch.model_inputs()`).
        labels: (B, T), already shifted, -100 outside the response tokens.
    """
    transform = head_transform(model.config)
    if transform is None:
        raise ValueError(f"the fused head does not know model_type {model.config.model_type!r}")
    logit_scale, softcap = transform
    empty = torch.empty(0, dtype=torch.long, device=labels.device)
    hidden = call(**inputs, logits_to_keep=empty, output_hidden_states=True).hidden_states[-1]
    head = model.get_output_embeddings()

    def fused_forward(h):  # runs inside head.__call__: ZeRO-3's hooks gather head's parameters around it
        stats = fused_token_stats(
            h,
            head.weight,
            labels,
            bias=head.bias,
            logit_scale=logit_scale,
            softcap=softcap,
            top_k=top_k,
            chunk_size=chunk_size,
        )
        return tuple(stats)  # a plain tuple: ZeRO-3 walks tuples when it hooks a module's outputs

    head.forward = fused_forward
    try:
        stats = head(hidden)
    finally:
        del head.forward  # the class's forward again
    return FusedTokenStats(*stats)
