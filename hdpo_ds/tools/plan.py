"""Memory planner for ZeRO-3 H-DPO runs of big models on many nodes.

    python -m hdpo_ds.tools.plan --model configs/models/command-r-35b --nodes 2 --gpus-per-node 8 \
        --gpu-mem-gib 80 --micro-batch-tokens 8192 [--ds ds_configs/zero3_35b.json] \
        [--reference online|adapters_off|cached|none] [--grad-checkpointing] [--json] \
        [--lora-r 16 --lora-targets all-linear|q_proj,v_proj --lora-modules-to-save embed_tokens]

It prints a per-GPU memory breakdown (what ZeRO-3 keeps per rank, what it gathers, activations,
logits, the reference), a verdict with headroom, the smallest change that fits when it does not, and
a step-time estimate from FLOPs. Parameter counts are exact: the architecture is instantiated on the
meta device (no memory). Byte counts follow DeepSpeed 0.19's ZeRO-3 code (stage3.py): a bf16
parameter shard and a bf16 gradient buffer per rank, fp32 master weights and the two Adam moments,
an fp32 copy of one optimizer sub-group's gradient during the step, the reduce and prefetch buckets,
and the largest module gathered whole (its parameters and its full gradient). Numbers that are
assumptions rather than arithmetic (MFU, the activation formula, allocator fragmentation, the runtime
reserve) are marked as such in the output.

Under LoRA (`--lora-r` > 0, model.lora) the adapters are counted exactly too (peft wraps the meta-device
model, as runtime/lora.py wraps the real one): the frozen base keeps only its parameter shard in the
model dtype (no gradient, fp32 master or Adam state); the adapters and modules_to_save copies carry all
four, sharded. With the adapters-off reference there is no reference shard.

`launch/train.py --dry-run` prints the same plan for a run config (hdpo_ds/tools/dryrun.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from hdpo_ds.config import ConfigError
from hdpo_ds.runtime import perf
from hdpo_ds.runtime.engine import zero3_auto_sizes

__all__ = [
    "Hardware",
    "LoraShape",
    "MemoryPlan",
    "ModelShape",
    "Settings",
    "analytic_param_count",
    "deepspeed_model_states",
    "format_plan",
    "largest_micro_batch",
    "load_hf_config",
    "lora_shape",
    "model_shape",
    "plan_memory",
    "recommend",
    "settings_from_ds_config",
]

GIB = 2**30
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's zero_optimization.sub_group_size default


# ------------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about an architecture; counts from the meta-device instance."""

    model_type: str
    num_params: int  # unique parameters (tied weights once)
    largest_layer_params: int  # the largest module's own parameters (what ZeRO-3 gathers at once)
    embedding_params: int
    tied_embeddings: bool
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    parallel_block: bool  # attention and MLP read one norm's output (Cohere); else two norms per layer
    logit_scale: bool  # logits are multiplied by a scale after lm_head (one more T×V tensor)
    # Mixture of experts: the parameters one token runs through (the router's k of E experts per layer
    # plus everything else), and E and k; a dense model has active_params == num_params, experts 0.
    active_params: int = 0
    num_experts: int = 0
    experts_per_token: int = 0


def load_hf_config(source: str, *, trust_remote_code: bool = False, key: str = "--model"):
    """A transformers config from a directory, a config.json path, or a hub id in the local cache.

    Raises ConfigError naming `key` when there is no such config or transformers does not know it.
    """
    from transformers import AutoConfig

    directory = (os.path.dirname(source) or ".") if source.endswith(".json") else source
    if source.endswith(".json") and not os.path.isfile(source):
        raise ConfigError(f"{key}: no such model config {source}")
    if os.path.isdir(directory) and not os.path.isfile(os.path.join(directory, "config.json")):
        raise ConfigError(f"{key}: {source} has no config.json")
    try:
        return AutoConfig.from_pretrained(
            directory, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: cannot read a model config from {source!r}: {first}") from None


def _meta_model(config, trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def model_shape(config, *, trust_remote_code: bool = False, key: str = "--model") -> ModelShape:
    """Instantiate `config` on the meta device (no memory) and count its parameters exactly."""
    try:
        model = _meta_model(config, trust_remote_code)
    except (ValueError, KeyError, ImportError) as e:
        raise ConfigError(
            f"{key}: transformers cannot build a causal LM from model_type "
            f"{getattr(config, 'model_type', '?')!r}: {e}"
        ) from None
    unique = {id(p): p.numel() for p in model.parameters()}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is embed
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    num_experts, top_k, expert_params = _experts(model, text)
    active = sum(unique.values()) - (
        expert_params * (num_experts - top_k) // num_experts if num_experts else 0
    )
    return ModelShape(
        model_type=text.model_type,
        num_params=sum(unique.values()),
        largest_layer_params=largest,
        embedding_params=embed.numel(),
        tied_embeddings=tied,
        hidden_size=hidden,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
        intermediate_size=getattr(text, "intermediate_size", None) or 4 * hidden,
        vocab_size=text.vocab_size,
        parallel_block=text.model_type in ("cohere", "cohere2"),
        logit_scale=getattr(text, "logit_scale", None) not in (None, 1, 1.0),
        active_params=active,
        num_experts=num_experts,
        experts_per_token=top_k,
    )


def _experts(model: torch.nn.Module, config) -> tuple[int, int, int]:
    """(E, k, parameters of all stacked expert tensors) of a mixture of experts, else (0, 0, 0). The
    experts of a layer are one module whose parameters all lead with E (transformers 5: `*Experts`)."""
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not num_experts or not top_k:
        return 0, 0, 0
    total = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if type(module).__name__.endswith("Experts") and own and all(p.shape[0] == num_experts for p in own):
            total += sum(p.numel() for p in own)
    return (int(num_experts), int(top_k), total) if total else (0, 0, 0)


@dataclass(frozen=True)
class LoraShape:
    """model.lora on an architecture, counted on the meta device with peft (runtime/lora.py's wrap)."""

    r: int
    target_modules: str | tuple[str, ...]  # "all-linear" or module names
    modules_to_save: tuple[str, ...]
    dropout: float
    adapter_params: int  # every lora_A and lora_B: r·(in + out) per adapted Linear of shape (out, in)
    saved_params: int  # the trainable copies peft makes of modules_to_save
    adapted_layers: int
    largest_trainable_module: int  # the largest module whose own parameters train (its gradient is gathered)
    adapter_inputs: int  # the sum of in_features over the adapted layers (dropout keeps a copy of each input)

    @property
    def trainable_params(self) -> int:
        return self.adapter_params + self.saved_params


def lora_shape(
    config,
    r: int,
    target_modules: str | list[str] = "all-linear",
    modules_to_save: list[str] | tuple[str, ...] = (),
    dropout: float = 0.0,
    *,
    trust_remote_code: bool = False,
    key: str = "--lora-targets",
) -> LoraShape:
    """peft's LoRA wrap of the meta-device model (no memory), counted: the planner's view of model.lora.

    Raises ConfigError naming `key` when the targets match no layer of the model."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = _meta_model(config, trust_remote_code)
    targets = target_modules if target_modules == "all-linear" else list(target_modules)
    peft_config = LoraConfig(
        r=r,
        target_modules=targets,
        modules_to_save=list(modules_to_save) or None,
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with torch.device("meta"):  # the adapters and the modules_to_save copies on meta too
            wrapped = get_peft_model(model, peft_config, autocast_adapter_dtype=False)
    except ValueError as e:
        raise ConfigError(f"{key}: {target_modules!r}: {e}") from None
    layers = [m for m in wrapped.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ConfigError(f"{key}: {target_modules!r} matches no layer of the model")
    adapters = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n and p.requires_grad)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    largest = max(
        sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad) for m in wrapped.modules()
    )
    return LoraShape(
        r=r,
        target_modules=target_modules if target_modules == "all-linear" else tuple(target_modules),
        modules_to_save=tuple(modules_to_save),
        dropout=dropout,
        adapter_params=adapters,
        saved_params=trainable - adapters,
        adapted_layers=len(layers),
        largest_trainable_module=largest,
        adapter_inputs=sum(m.in_features for m in layers),
    )


def analytic_param_count(config) -> int:
    """The parameter count worked out by hand for the Llama / Mistral / Cohere families.

    Per layer: q and o (hidden × heads·head_dim each), k and v (hidden × kv_heads·head_dim each), the
    gated MLP (3 × hidden × intermediate), and the norms (two of size hidden for Llama, one for
    Cohere's parallel block); plus the embedding, the final norm, and an untied lm_head.
    """
    model_type = config.model_type
    if model_type not in ("llama", "mistral", "cohere"):
        raise ValueError(f"no analytic count for model_type {model_type!r} (llama, mistral, cohere)")
    h, v, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q_dim, kv_dim = heads * head_dim, kv * head_dim
    attn = 2 * h * q_dim + 2 * h * kv_dim
    if getattr(config, "attention_bias", False):
        attn += 2 * q_dim + 2 * kv_dim if model_type != "cohere" else q_dim + 2 * kv_dim + h
    mlp = 3 * h * config.intermediate_size
    if getattr(config, "mlp_bias", False):
        mlp += 2 * config.intermediate_size + h
    if model_type == "cohere":
        norms = h  # one LayerNorm (weight only) feeds attention and MLP in parallel
        if getattr(config, "use_qk_norm", False):
            norms += heads * head_dim + kv * head_dim
    else:
        norms = 2 * h
    total = v * h + layers * (attn + mlp + norms) + h
    if not config.tie_word_embeddings:
        total += v * h
    return total


# ------------------------------------------------------------------------------------- the settings


@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    peak_tflops: float = 989.0  # dense bf16 tensor-core peak of an H100 SXM; A100: 312
    host_mem_gib: float | None = None  # per node; checked when optimizer / parameter offload is on

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Settings:
    micro_batch_tokens: int
    # online (a reference engine) | adapters_off (LoRA: the policy's engine, adapters disabled) | cached |
    # none (a reference-free loss: SimPO, CPO, ORPO)
    reference: str = "online"
    reference_offload: bool = False
    grad_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_param: bool = False
    dtype_bytes: int = 2  # 2: bf16/fp16 training with fp32 master weights; 4: fp32 (no separate master)
    sub_group_size: int = DEFAULT_SUB_GROUP_SIZE
    reduce_bucket_size: int | None = None  # elements; None: DeepSpeed's hidden² ("auto")
    prefetch_bucket_size: int | None = None  # elements; None: 0.9·hidden² ("auto")
    contiguous_gradients: bool = True
    max_live_parameters: int = 1_000_000_000  # zero_optimization.stage3_max_live_parameters
    logits_chunk_size: int = 1024  # train.logits_chunk_size
    fused_head: bool = False  # train.fused_head resolved: no T×V logits (runtime/fused_head.py)
    fused_optimizer: bool = True  # GPU FusedAdam updates in place; torch's AdamW (CPU) makes temporaries
    lora: LoraShape | None = None  # model.lora: a frozen base, only the adapters (+ modules_to_save) train
    # train.sequence_parallel: groups of this many ranks share a row of sequence_parallel x
    # micro_batch_tokens tokens (Ulysses); micro_batch_tokens stays per rank
    sequence_parallel: int = 1
    # Assumptions (stated in the output):
    mfu: float = 0.40
    fragmentation: float = 0.10  # allocator fragmentation on top of live tensors
    runtime_reserve_gib: float = 3.0  # CUDA context, NCCL buffers, kernels' workspaces
    seq_tokens: int = 2048  # mean sequence length inside a packed micro-batch (attention FLOPs)


def settings_from_ds_config(ds_config: dict, **overrides: Any) -> Settings:
    """Offload, precision and bucket sizes as a ds_config states them ("auto" keeps the planner's
    defaults, which are the values engine.fill_ds_config fills)."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        raise ConfigError(f"--ds: the planner models ZeRO stage 3; this config has stage {zero.get('stage')}")

    def offloaded(section: str) -> bool:
        return (zero.get(section) or {}).get("device", "none") not in ("none", None)

    def number(key: str) -> int | None:
        value = zero.get(key, "auto")
        return None if value == "auto" else int(value)

    bf16 = ds_config.get("bf16", {}).get("enabled", "auto")
    fp16 = ds_config.get("fp16", {}).get("enabled", "auto")
    # "auto" resolves to bf16 on GPUs that have it (engine.resolve_dtype), which the plan is for.
    half = bf16 in (True, "auto") or fp16 is True
    values = dict(
        offload_optimizer=offloaded("offload_optimizer"),
        offload_param=offloaded("offload_param"),
        dtype_bytes=2 if half else 4,
        sub_group_size=int(zero.get("sub_group_size", DEFAULT_SUB_GROUP_SIZE)),
        reduce_bucket_size=number("reduce_bucket_size"),
        prefetch_bucket_size=number("stage3_prefetch_bucket_size"),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        max_live_parameters=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
    )
    values.update(overrides)
    return Settings(**values)


# ----------------------------------------------------------------------------------------- the plan


@dataclass
class Row:
    name: str
    bytes: int
    where: str  # "gpu", "host" (per GPU's share) or "-" (not needed)
    note: str = ""
    assumption: bool = False


@dataclass
class MemoryPlan:
    shape: ModelShape
    hardware: Hardware
    settings: Settings
    rows: list[Row]
    model_states_bytes: int  # what DeepSpeed's estimator covers: states + gathered layer / step transient
    peak_bytes: int  # live tensors at the worse of the backward and the optimizer step
    peak_phase: str
    required_bytes: int  # peak × (1 + fragmentation) + runtime reserve
    host_bytes_per_node: int
    step_flops_per_micro_batch: float
    seconds_per_micro_batch: float
    assumptions: list[str] = field(default_factory=list)

    @property
    def capacity_bytes(self) -> int:
        return int(self.hardware.gpu_mem_gib * GIB)

    @property
    def headroom_bytes(self) -> int:
        return self.capacity_bytes - self.required_bytes

    @property
    def fits(self) -> bool:
        host_ok = (
            self.hardware.host_mem_gib is None or self.host_bytes_per_node <= self.hardware.host_mem_gib * GIB
        )
        return self.headroom_bytes >= 0 and host_ok

    def to_dict(self) -> dict:
        return {
            "model": dataclasses.asdict(self.shape),
            "hardware": {**dataclasses.asdict(self.hardware), "world_size": self.hardware.world_size},
            "settings": dataclasses.asdict(self.settings),
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "model_states_bytes": self.model_states_bytes,
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "required_bytes": self.required_bytes,
            "capacity_bytes": self.capacity_bytes,
            "headroom_bytes": self.headroom_bytes,
            "host_bytes_per_node": self.host_bytes_per_node,
            "fits": self.fits,
            "step_flops_per_micro_batch": self.step_flops_per_micro_batch,
            "seconds_per_micro_batch": self.seconds_per_micro_batch,
            "assumptions": self.assumptions,
        }


def ulysses_bytes_per_token_layer(shape: ModelShape, dtype_bytes: int, sequence_parallel: int) -> int:
    """What Ulysses adds per local token and layer (assumption): the attention core keeps its inputs and
    output in the all-to-all's layout (q, k, v for the whole row at H/S heads, the same bytes as the local
    q, k, v; key/value heads replicated up to S when there are fewer), and the output before the
    reverse all-to-all."""
    if sequence_parallel == 1:
        return 0
    q = shape.num_heads * shape.head_dim
    kv = max(shape.num_kv_heads, sequence_parallel) * shape.head_dim
    return (2 * q + 2 * kv) * dtype_bytes


def activation_bytes_per_token_layer(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes one decoder layer keeps for its backward, per token (assumption: the formula below).

    Counted from what autograd saves in transformers' Llama/Cohere layers with a fused attention
    kernel (no T×T scores): each RMSNorm/LayerNorm keeps an fp32 copy of its input, its normalised
    input and its output ((4 + 2b)·h bytes); attention keeps q, k, v, its output and the reshaped copy
    o_proj reads ((3·q + 2·kv)·b); the gated MLP keeps gate, up, act(gate) and their product (4·I·b).
    """
    b, h = dtype_bytes, shape.hidden_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    norms = 1 if shape.parallel_block else 2
    return norms * (4 + 2 * b) * h + (3 * q + 2 * kv + 4 * shape.intermediate_size) * b


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
    """Activations of one micro-batch of `tokens` tokens, plus one layer's worth of gradients in flight.

    With checkpointing each layer keeps only its input (h·b per token) and one layer is recomputed at a
    time in the backward."""
    per_layer = activation_bytes_per_token_layer(shape, dtype_bytes)
    final_norm = (4 + 2 * dtype_bytes) * shape.hidden_size
    if checkpointing:
        kept = shape.num_layers * shape.hidden_size * dtype_bytes + 2 * per_layer
    else:
        kept = shape.num_layers * per_layer + per_layer
    return tokens * (kept + final_norm)


def logits_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, chunk_size: int) -> int:
    """The logits (T×V in the model dtype), their gradient, a scaled copy where the model scales its
    logits, and token_stats' one fp32 buffer of chunk×V (docs/benchmarks.md measures that buffer)."""
    full = tokens * shape.vocab_size * dtype_bytes
    copies = 3 if shape.logit_scale else 2
    return copies * full + min(chunk_size, tokens) * shape.vocab_size * 4


def lora_activation_bytes(
    lora: LoraShape, shape: ModelShape, tokens: int, dtype_bytes: int, checkpointing: bool
) -> int:
    """What the adapters add to the activations (assumption: spread evenly over the layers): lora_B keeps
    lora_A's output (r values per adapted layer and token); with model.lora.dropout > 0 each adapted layer
    keeps its dropped-out input (in_features values) and the dropout mask (1 byte each). The frozen base's
    own matmuls keep nothing more than the full model's (the adapter's lora_A keeps the same input)."""
    per_token = lora.adapted_layers * lora.r * dtype_bytes
    if lora.dropout > 0:
        per_token += lora.adapter_inputs * (dtype_bytes + 1)
    per_layer = per_token / shape.num_layers
    kept = 2 * per_layer if checkpointing else (shape.num_layers + 1) * per_layer
    return int(tokens * kept)


def fused_head_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, chunk_size: int) -> int:
    """The fused head's backward chunk (objectives/fused_head.py): the chunk's fp32 logits, turned into
    their gradient in place, and that gradient in the model dtype for the two products. Its dW is the
    gathered lm_head gradient the 'largest layer gathered' row already counts when lm_head is largest."""
    return min(chunk_size, tokens) * shape.vocab_size * (4 + dtype_bytes)


def _flops_params(shape: ModelShape) -> int:
    # An untied input embedding is a lookup, not a matmul; a tied one is also lm_head. A token of a
    # mixture of experts runs through its k routed experts only: the active parameters.
    active = shape.active_params or shape.num_params
    return active - (0 if shape.tied_embeddings else shape.embedding_params)


def micro_batch_flops(shape: ModelShape, settings: Settings) -> float:
    """The model FLOPs of one micro-batch per rank (runtime/perf.py micro_batch_flops: 6·N·T trained,
    4·N·T for a frozen LoRA base, causal attention, the online reference's forward) plus what gradient
    checkpointing recomputes (one more policy forward). Attention over sequences of `seq_tokens`
    (assumption): Σn² ≈ T·seq_tokens. Under sequence parallelism (S ranks per row of S·T tokens) a
    rank's T queries attend over sequences of up to S·T tokens (for H/S heads each of the group's S·T
    queries: the same count)."""
    t = settings.micro_batch_tokens
    n = _flops_params(shape)
    trained = n if settings.lora is None else settings.lora.adapter_params
    counts = perf.FlopCounts(
        trained=trained,
        frozen=0 if settings.lora is None else n,
        layers=shape.num_layers,
        attention_width=shape.num_heads * shape.head_dim,
    )
    squares = t * min(settings.seq_tokens, settings.sequence_parallel * t)
    online = settings.reference in ("online", "adapters_off")
    reference = dataclasses.replace(counts, trained=0, frozen=n) if online else None
    flops = perf.micro_batch_flops(counts, t, squares, reference=reference)
    if settings.grad_checkpointing:
        flops += 2 * counts.params * t + perf.attention_flops(counts, squares)
    return flops


def plan_memory(shape: ModelShape, hardware: Hardware, settings: Settings) -> MemoryPlan:
    """The per-GPU memory of one ZeRO-3 rank at its two peaks (backward, optimizer step)."""
    n = hardware.world_size
    x = math.ceil(shape.num_params / n)  # this rank's partition (elements)
    lora = settings.lora
    # What trains: the whole model, or (LoRA) the adapters and modules_to_save copies alone, whose shard xt
    # carries the gradient, the fp32 master and Adam's moments; the frozen base keeps only its b·x shard.
    xt = x if lora is None else math.ceil(lora.trainable_params / n)
    b = settings.dtype_bytes
    h = shape.hidden_size
    t = settings.micro_batch_tokens
    big = shape.largest_layer_params
    auto = zero3_auto_sizes(h)
    reduce_bucket = (
        settings.reduce_bucket_size if settings.reduce_bucket_size is not None else auto["reduce_bucket_size"]
    )
    prefetch_bucket = settings.prefetch_bucket_size
    if prefetch_bucket is None:
        prefetch_bucket = auto["stage3_prefetch_bucket_size"]
    opt_where = "host" if settings.offload_optimizer else "gpu"
    param_where = "host" if settings.offload_param else "gpu"
    master = 0 if b == 4 else 4 * xt  # fp32 training updates the parameters themselves
    step_group = min(xt, settings.sub_group_size)
    # During the step: the sub-group's gradient flattened and cast to fp32 (a copy in either dtype),
    # and, for torch's (unfused) AdamW, the sqrt and division temporaries of its update.
    step_transient = 4 * step_group + (0 if settings.fused_optimizer else 8 * step_group)
    gathered = 2 * b * big  # the largest module's parameters and its full gradient, both gathered
    if lora is not None:  # a frozen module is gathered without a gradient; a trainable one with its own
        gathered = max(b * big, 2 * b * lora.largest_trainable_module)
    # DeepSpeed keeps gathered parameters alive up to stage3_max_live_parameters when they are reused
    # soon (stage3_max_reuse_distance): measured on CPU, a 61M model with both at 1e9 stays whole.
    all_params = shape.num_params + (0 if lora is None else lora.trainable_params)
    live_extra = b * max(0, min(settings.max_live_parameters, all_params) - big)
    buffers = (reduce_bucket * b if settings.contiguous_gradients else 0) + prefetch_bucket * b
    acts = activation_bytes(shape, t, b, settings.grad_checkpointing)
    acts_other = activation_bytes(shape, t, b, not settings.grad_checkpointing)
    sp = settings.sequence_parallel
    ulysses = ulysses_bytes_per_token_layer(shape, b, sp) * t
    # with checkpointing one layer at a time is recomputed: its Ulysses copies only
    ulysses_kept = ulysses * (2 if settings.grad_checkpointing else shape.num_layers + 1)
    acts += ulysses_kept
    if lora is not None:
        acts += lora_activation_bytes(lora, shape, t, b, settings.grad_checkpointing)
        acts_other += lora_activation_bytes(lora, shape, t, b, not settings.grad_checkpointing)
    if settings.fused_head:
        logits = fused_head_bytes(shape, t, b, settings.logits_chunk_size)
    else:
        logits = logits_bytes(shape, t, b, settings.logits_chunk_size)
    ref_shard = b * x if settings.reference == "online" else 0
    ref_where = "-" if settings.reference != "online" else ("host" if settings.reference_offload else "gpu")

    dtype_name = "bf16" if b == 2 else "fp32"
    rows = [
        Row(
            f"parameters ({dtype_name} shard)"
            if lora is None
            else f"frozen base parameters ({dtype_name} shard)",
            b * x,
            param_where,
            f"{x:,} of {shape.num_params:,} parameters on this rank"
            + ("" if lora is None else "; no gradient, master or Adam state"),
        ),
        *(
            []
            if lora is None
            else [
                Row(
                    "LoRA adapters + modules_to_save (shard)",
                    b * xt,
                    param_where,
                    f"{xt:,} of {lora.trainable_params:,} trainable parameters on this rank",
                )
            ]
        ),
        Row(
            "gradients (shard)",
            b * xt,
            opt_where,
            "ZeRO-3 gradient buffer in the model dtype" + ("" if lora is None else ", trainable only"),
        ),
        Row(
            "fp32 master weights (shard)",
            master,
            opt_where if master else "-",
            "none: fp32 training updates the parameters" if not master else "",
        ),
        Row("Adam moments m, v (fp32 shard)", 8 * xt, opt_where),
        Row(
            "optimizer step: fp32 gradient of one sub-group",
            step_transient if opt_where == "gpu" else 0,
            opt_where,
            f"min(shard, sub_group_size={settings.sub_group_size:,}) elements; only during the step"
            + ("" if settings.fused_optimizer else "; plus torch AdamW's temporaries"),
        ),
        Row(
            "ZeRO-3 reduce + prefetch buckets",
            buffers,
            "gpu",
            f"reduce_bucket_size={reduce_bucket:,}, stage3_prefetch_bucket_size={prefetch_bucket:,}",
        ),
        Row(
            "largest layer gathered (parameters + gradient)",
            gathered,
            "gpu",
            f"{big:,} parameters gathered whole during forward/backward"
            + (
                ""
                if lora is None
                else f"; frozen: no gradient (largest trainable module {lora.largest_trainable_module:,})"
            ),
        ),
        Row(
            "parameters kept gathered beyond it",
            live_extra,
            "gpu",
            f"up to stage3_max_live_parameters={settings.max_live_parameters:,} "
            "(not in DeepSpeed's estimator)",
        ),
        Row(
            f"activations, {t:,} tokens, "
            f"{'with' if settings.grad_checkpointing else 'without'} checkpointing",
            acts,
            "gpu",
            "formula: activation_bytes_per_token_layer",
            assumption=True,
        ),
        *(
            []
            if sp == 1
            else [
                Row(
                    f"  of which Ulysses' all-to-all copies (sequence parallel {sp})",
                    ulysses_kept,
                    "-",
                    f"a row of {sp * t:,} tokens over {sp} ranks; included above "
                    "(formula: ulysses_bytes_per_token_layer)",
                    assumption=True,
                )
            ]
        ),
        Row(
            f"  (activations {'without' if settings.grad_checkpointing else 'with'} checkpointing, not used)",
            acts_other,
            "-",
            "for comparison",
            assumption=True,
        ),
        Row(
            "logits: the fused head's chunk only"
            if settings.fused_head
            else "logits + gradient + token-stats chunk",
            logits,
            "gpu",
            f"chunk×V = {min(settings.logits_chunk_size, t):,}×{shape.vocab_size:,}, fp32 + model dtype"
            if settings.fused_head
            else f"T×V = {t:,}×{shape.vocab_size:,}; chunk {settings.logits_chunk_size}",
        ),
        Row(
            "reference model (shard)",
            ref_shard,
            ref_where,
            {
                "cached": "cached reference: no model",
                "none": "reference-free loss: no reference",
                "adapters_off": "adapters off: the policy's engine is the reference, no second model",
            }.get(settings.reference, "ZeRO-3 inference engine, no optimizer"),
        ),
    ]

    on_gpu = {r.name: r.bytes for r in rows if r.where == "gpu"}
    persistent = sum(
        v
        for k, v in on_gpu.items()
        if not k.startswith(("optimizer step", "largest", "parameters kept", "activations", "logits"))
    )
    backward = persistent + gathered + live_extra + acts + logits
    step = persistent + (step_transient if opt_where == "gpu" else 0)
    if (settings.reference == "online" and ref_where == "gpu") or settings.reference == "adapters_off":
        # The reference forward runs before the policy's and frees its gathered layer and logits first
        # (adapters_off: the same engine's forward under no_grad, so also transient).
        ref_logits = logits if settings.fused_head else t * shape.vocab_size * b
        backward = max(backward, persistent + b * big + ref_logits)
    peak, phase = (backward, "backward") if backward >= step else (step, "optimizer step")
    states = rows[: 4 if lora is None else 5]  # parameters (and adapters), gradients, master, Adam
    model_states = (
        sum(on_gpu.get(r.name, 0) for r in states)
        + buffers
        + max(gathered, step_transient if opt_where == "gpu" else 0)
    )
    required = int(peak * (1 + settings.fragmentation) + settings.runtime_reserve_gib * GIB)

    host_per_gpu = sum(r.bytes for r in rows if r.where == "host")
    if settings.offload_optimizer:
        host_per_gpu += 4 * xt  # the fp32 gradient partition the CPU Adam steps on
    host_per_node = host_per_gpu * hardware.gpus_per_node

    flops = micro_batch_flops(shape, settings)
    seconds = flops / (settings.mfu * hardware.peak_tflops * 1e12)
    assumptions = [
        f"MFU {settings.mfu:.0%} of {hardware.peak_tflops:g} TFLOP/s peak per GPU (step time)",
        f"mean sequence length {settings.seq_tokens:,} tokens inside a micro-batch (attention FLOPs)",
        "activation formula: what autograd keeps in transformers' Llama/Cohere layers with a fused "
        "(flash/varlen) attention kernel; eager attention adds heads×L² per sequence",
        f"allocator fragmentation +{settings.fragmentation:.0%} on the live peak",
        f"runtime reserve {settings.runtime_reserve_gib:g} GiB per GPU (CUDA context, NCCL, workspaces)",
        "not modelled: CPU-Adam and PCIe time under offload; the reference engine's own live parameters",
    ]
    if sp > 1:
        assumptions.append(
            f"sequence parallel {sp}: Ulysses' all-to-all copies per layer (ulysses_bytes_per_token_layer); "
            "its all-to-all time is not in the step time"
        )
    if lora is not None:
        assumptions.append(
            "LoRA activations: lora_A's output (r per adapted layer and token) and, with dropout, each "
            "adapted layer's dropped-out input and mask, spread evenly over the layers"
        )
    return MemoryPlan(
        shape,
        hardware,
        settings,
        rows,
        int(model_states),
        int(peak),
        phase,
        required,
        int(host_per_node),
        flops,
        seconds,
        assumptions,
    )


def deepspeed_model_states(
    shape: ModelShape, hardware: Hardware, *, offload_optimizer: bool, offload_param: bool
) -> tuple[int, int]:
    """DeepSpeed's own ZeRO-3 estimate (GPU bytes per GPU, CPU bytes per node) for the same settings."""
    # DeepSpeed's logger binds to sys.stdout when first imported; stdout belongs to the plan (--json).
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=shape.num_params,
        largest_layer_params=shape.largest_layer_params,
        num_gpus_per_node=hardware.gpus_per_node,
        num_nodes=hardware.nodes,
        cpu_offload=offload_optimizer,
        cpu_offload_params=offload_param,
        zero_init=True,
    )
    return gpu, cpu


def largest_micro_batch(
    shape: ModelShape, hardware: Hardware, settings: Settings, limit: int = 1 << 20
) -> int:
    """The largest micro-batch (tokens, a power-of-two multiple of the requested one, at most `limit`)
    that still fits with otherwise the same settings; 0 when even the requested one does not."""
    tokens = 0
    candidate = settings.micro_batch_tokens
    while candidate <= limit:
        if not plan_memory(shape, hardware, dataclasses.replace(settings, micro_batch_tokens=candidate)).fits:
            break
        tokens, candidate = candidate, 2 * candidate
    return tokens


def recommend(shape: ModelShape, hardware: Hardware, settings: Settings, min_tokens: int) -> dict | None:
    """The least intrusive change that fits: no offload before optimizer offload before parameter
    offload; within each, the requested micro-batch tokens without, then with checkpointing, then
    halved tokens (down to `min_tokens`, the size one pair needs). None when nothing fits."""
    tokens = [settings.micro_batch_tokens]
    while tokens[-1] // 2 >= min_tokens:
        tokens.append(tokens[-1] // 2)
    offloads = [(False, False), (True, False), (True, True)]
    for opt, param in offloads:
        if (opt, param) < (settings.offload_optimizer, settings.offload_param):
            continue  # never suggest undoing offload the user asked for: they may need the GPU memory
        for t in tokens:
            for ckpt in (settings.grad_checkpointing, True):
                candidate = dataclasses.replace(
                    settings,
                    offload_optimizer=opt,
                    offload_param=param,
                    micro_batch_tokens=t,
                    grad_checkpointing=ckpt,
                )
                plan = plan_memory(shape, hardware, candidate)
                if plan.fits:
                    return {
                        "offload_optimizer": opt,
                        "offload_param": param,
                        "micro_batch_tokens": t,
                        "grad_checkpointing": ckpt,
                        "required_bytes": plan.required_bytes,
                        "headroom_bytes": plan.headroom_bytes,
                    }
    return None


# ------------------------------------------------------------------------------------------- output


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def _lora_line(lora: LoraShape, m: ModelShape) -> str:
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(lora.target_modules)
    saved = ",".join(lora.modules_to_save) or "none"
    return (
        f"LoRA: r={lora.r} on {lora.adapted_layers} layers (targets {targets}), dropout {lora.dropout:g}: "
        f"{lora.adapter_params:,} adapter parameters + {lora.saved_params:,} in modules_to_save ({saved}) "
        f"train ({lora.trainable_params / m.num_params:.3%} of the base); the {m.num_params:,} base "
        "parameters are frozen: their shard only, no gradient, fp32 master or Adam state"
    )


def format_plan(
    plan: MemoryPlan, recommendation: dict | None = None, deepspeed: tuple[int, int] | None = None
) -> str:
    s, hw, m = plan.settings, plan.hardware, plan.shape
    lines = [
        f"model: {m.model_type}, {m.num_params:,} parameters (meta-device count), largest layer "
        f"{m.largest_layer_params:,}, hidden {m.hidden_size}, {m.num_layers} layers, vocab {m.vocab_size:,}"
        f"{', tied embeddings' if m.tied_embeddings else ''}",
        *(
            [
                f"mixture of experts: {m.num_experts} experts, top-{m.experts_per_token}: "
                f"{m.active_params:,} active parameters per token (FLOPs use these; ZeRO-3 gathers a "
                "layer's stacked experts whole, whatever the routing: the largest layer above)"
            ]
            if m.num_experts
            else []
        ),
        *([_lora_line(s.lora, m)] if s.lora is not None else []),
        f"cluster: {hw.nodes} node(s) × {hw.gpus_per_node} GPU(s) = {hw.world_size} ranks, "
        f"{hw.gpu_mem_gib:g} GiB per GPU",
        f"settings: {'bf16' if s.dtype_bytes == 2 else 'fp32'}, ZeRO-3, "
        f"micro-batch {s.micro_batch_tokens:,} tokens"
        + (
            f" per rank (sequence parallel {s.sequence_parallel}: rows of "
            f"{s.sequence_parallel * s.micro_batch_tokens:,} tokens), "
            if s.sequence_parallel > 1
            else ", "
        )
        + f"offload optimizer {'on' if s.offload_optimizer else 'off'}, offload parameters "
        f"{'on' if s.offload_param else 'off'}, "
        f"gradient checkpointing {'on' if s.grad_checkpointing else 'off'}, "
        f"reference {s.reference}{' (offloaded)' if s.reference_offload and s.reference == 'online' else ''}",
        "",
        f"{'per GPU':<58} {'memory':>12}  where  note",
    ]
    for r in plan.rows:
        flag = " [assumption]" if r.assumption else ""
        lines.append(f"{r.name:<58} {_gib(r.bytes):>12}  {r.where:<5}  {r.note}{flag}")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines += [
        "",
        f"model states (DeepSpeed's estimator's scope): {_gib(plan.model_states_bytes).strip()}"
        + (
            f"; DeepSpeed estimate_zero3_model_states_mem_needs: {_gib(deepspeed[0]).strip()} "
            f"({(plan.model_states_bytes / deepspeed[0] - 1):+.1%})"
            if deepspeed
            else ""
        ),
        f"peak live on one GPU ({plan.peak_phase}): {_gib(plan.peak_bytes).strip()}; with "
        f"+{s.fragmentation:.0%} fragmentation and {s.runtime_reserve_gib:g} GiB runtime reserve "
        f"[assumptions]: {_gib(plan.required_bytes).strip()} of {hw.gpu_mem_gib:g} GiB",
        f"host memory per node for offloaded state: {_gib(plan.host_bytes_per_node).strip()}"
        + (f" of {hw.host_mem_gib:g} GiB" if hw.host_mem_gib is not None else ""),
        f"verdict: {verdict}, headroom {_gib(plan.headroom_bytes).strip()} per GPU",
    ]
    if recommendation is not None and not plan.fits:
        r = recommendation
        lines.append(
            f"smallest change that fits: offload optimizer {'on' if r['offload_optimizer'] else 'off'}, "
            f"offload parameters {'on' if r['offload_param'] else 'off'}, "
            f"micro-batch {r['micro_batch_tokens']:,} tokens, "
            f"gradient checkpointing {'on' if r['grad_checkpointing'] else 'off'} "
            f"({_gib(r['required_bytes']).strip()}, headroom {_gib(r['headroom_bytes']).strip()})"
        )
    elif not plan.fits:
        lines.append("nothing fits at this world size: add nodes or use GPUs with more memory")
    else:
        bigger = largest_micro_batch(plan.shape, plan.hardware, plan.settings)
        if bigger > s.micro_batch_tokens:
            lines.append(f"micro-batches of up to {bigger:,} tokens would fit with these settings")
    lines += [
        f"step time [assumption: MFU]: {plan.step_flops_per_micro_batch:.3e} FLOP per micro-batch per GPU "
        f"-> {plan.seconds_per_micro_batch:.2f} s per micro-batch at {s.mfu:.0%} MFU",
        "",
        "assumptions:",
        *[f"  - {a}" for a in plan.assumptions],
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hdpo_ds.tools.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model directory, config.json, or a cached hub id")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-mem-gib", type=float, required=True)
    parser.add_argument(
        "--micro-batch-tokens", type=int, required=True, help="data.max_tokens_per_micro_batch"
    )
    parser.add_argument(
        "--min-micro-batch-tokens",
        type=int,
        default=2048,
        help="smallest micro-batch to recommend: 2 × data.max_length, so that one pair fits",
    )
    parser.add_argument("--ds", default=None, help="DeepSpeed JSON: offload, precision and bucket sizes")
    parser.add_argument(
        "--reference",
        choices=["online", "adapters_off", "cached", "none"],
        default=None,
        help="online: a reference engine; adapters_off: LoRA's policy with its adapters disabled (the "
        "default with --lora-r, as reference.source=auto); cached; none: a reference-free loss",
    )
    parser.add_argument("--lora-r", type=int, default=0, help="model.lora.r (0: full fine-tuning)")
    parser.add_argument(
        "--lora-targets", default="all-linear", help="model.lora.target_modules: all-linear or name,name"
    )
    parser.add_argument(
        "--lora-modules-to-save", default="", help="model.lora.modules_to_save: name,name (default none)"
    )
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="model.lora.dropout")
    parser.add_argument("--reference-offload", action="store_true", help="reference.offload=true")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--fused-head", action="store_true", help="train.fused_head on: no T×V logits")
    parser.add_argument("--offload-optimizer", action="store_true", help="as if the ds_config offloaded it")
    parser.add_argument("--peak-tflops", type=float, default=Hardware.peak_tflops, help="per GPU, bf16 dense")
    parser.add_argument("--host-mem-gib", type=float, default=None, help="host RAM per node")
    parser.add_argument("--mfu", type=float, default=Settings.mfu, help="assumed model FLOPs utilisation")
    parser.add_argument(
        "--seq-tokens", type=int, default=Settings.seq_tokens, help="assumed mean sequence length"
    )
    parser.add_argument(
        "--sequence-parallel",
        type=int,
        default=1,
        help="train.sequence_parallel: ranks per row (--micro-batch-tokens stays per rank)",
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        for key, value in (
            ("--nodes", args.nodes),
            ("--gpus-per-node", args.gpus_per_node),
            ("--micro-batch-tokens", args.micro_batch_tokens),
            ("--sequence-parallel", args.sequence_parallel),
        ):
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if (args.nodes * args.gpus_per_node) % args.sequence_parallel:
            raise ConfigError(
                f"--sequence-parallel: {args.sequence_parallel} does not divide the "
                f"{args.nodes * args.gpus_per_node} ranks"
            )
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu: must lie in (0, 1], got {args.mfu}")
        if args.lora_r < 0:
            raise ConfigError(f"--lora-r: must be >= 0 (0: no LoRA), got {args.lora_r}")
        if args.lora_r == 0 and args.reference == "adapters_off":
            raise ConfigError("--reference: adapters_off needs LoRA adapters to switch off (--lora-r > 0)")
        hf_config = load_hf_config(args.model, trust_remote_code=args.trust_remote_code)
        shape = model_shape(hf_config, trust_remote_code=args.trust_remote_code)
        sp = args.sequence_parallel
        if shape.num_heads % sp or (shape.num_kv_heads % sp and sp % shape.num_kv_heads):
            raise ConfigError(
                f"--sequence-parallel: {sp} must divide the model's {shape.num_heads} attention heads, and "
                f"its {shape.num_kv_heads} key/value heads must be a multiple or a divisor of it"
            )
        lora = None
        if args.lora_r:
            targets = args.lora_targets.strip()
            lora = lora_shape(
                hf_config,
                args.lora_r,
                targets if targets == "all-linear" else [t for t in targets.split(",") if t],
                [m for m in args.lora_modules_to_save.split(",") if m],
                args.lora_dropout,
                trust_remote_code=args.trust_remote_code,
            )
        reference = args.reference or ("adapters_off" if lora is not None else "online")
        common = dict(
            micro_batch_tokens=args.micro_batch_tokens,
            reference=reference,
            lora=lora,
            reference_offload=args.reference_offload,
            grad_checkpointing=args.grad_checkpointing,
            mfu=args.mfu,
            seq_tokens=args.seq_tokens,
            fused_head=args.fused_head,
            sequence_parallel=args.sequence_parallel,
        )
        if args.ds:
            from hdpo_ds.runtime.engine import load_ds_config

            settings = settings_from_ds_config(load_ds_config(args.ds), **common)
        else:
            settings = Settings(**common)
        if args.offload_optimizer:
            settings = dataclasses.replace(settings, offload_optimizer=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    hardware = Hardware(args.nodes, args.gpus_per_node, args.gpu_mem_gib, args.peak_tflops, args.host_mem_gib)
    plan = plan_memory(shape, hardware, settings)
    advice = recommend(
        shape, hardware, settings, min_tokens=min(args.micro_batch_tokens, args.min_micro_batch_tokens)
    )
    # DeepSpeed's estimator assumes every parameter trains: no comparison under LoRA.
    ds_estimate = (
        None
        if settings.lora is not None
        else deepspeed_model_states(
            shape,
            hardware,
            offload_optimizer=settings.offload_optimizer,
            offload_param=settings.offload_param,
        )
    )
    if args.json:
        out = plan.to_dict()
        out["recommendation"] = advice
        out["largest_micro_batch_tokens"] = largest_micro_batch(shape, hardware, settings)
        out["deepspeed_estimate"] = (
            None
            if ds_estimate is None
            else {"gpu_bytes_per_gpu": ds_estimate[0], "cpu_bytes_per_node": ds_estimate[1]}
        )
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, advice, ds_estimate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
