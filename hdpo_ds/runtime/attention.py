"""Attention implementations for the rows hdpo_ds feeds a model, and the check that a model gets the one
it asks for.

Packed micro-batches carry several sequences per row with position_ids restarting at 0 and no mask;
`torch_varlen` (torch's flash-attention varlen kernel, CUDA), `sdpa_packed` and `eager_packed`
(registered with transformers' AttentionInterface) attend within each sequence, at the boundaries the
collator computed once per micro-batch (`PackedBatch.seq_offsets` / `cu_seq_lens`), so no layer reads
position_ids back from the device. `choose_attention` picks or checks an implementation against what
the model's config asks for (`attention_features`) and what the device and dtype run, and says why; a
feature the implementation lacks is refused, never silently dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import inspect
import itertools

import torch
import torch.nn.functional as F

from hdpo_ds.config import ConfigError

__all__ = [
    "ATTENTION_SUPPORT",
    "EAGER_PACKED",
    "SDPA_PACKED",
    "TORCH_VARLEN",
    "AttentionChoice",
    "attention_features",
    "check_attention",
    "check_packed_forward",
    "choose_attention",
    "select_attention",
]

SDPA_PACKED = "sdpa_packed"
EAGER_PACKED = "eager_packed"
TORCH_VARLEN = "torch_varlen"
HALF_DTYPES = (torch.float16, torch.bfloat16)

# What each attention implementation applies on the rows hdpo_ds feeds it (packed: position_ids restart
# at 0 per sequence and no attention mask; padded: a mask). A model asking for a feature its
# implementation lacks is refused (ConfigError) instead of silently getting plain causal attention; an
# implementation added later must be declared here, or select_attention refuses it. Features:
#   sliding_window  a local window (Mistral, Qwen2 use_sliding_window, Gemma-2, gpt-oss, ...)
#   softcap         attn_logit_softcapping (Gemma-2): tanh-capped logits, no sdpa kernel does it
#   sinks           a learned per-head logit column (gpt-oss): sdpa and flash-attn 2 drop it
#   bidirectional   use_bidirectional_attention / is_causal false: the per-sequence paths are causal only
#   chunked         attention_chunk_size (Llama 4): only the masks transformers builds apply it
#   no_sdpa         the model class refuses sdpa kernels (transformers' _supports_sdpa)
#   mask_packing    packed rows whose model builds its masks without position_ids (transformers 5.23:
#                   gpt_oss), so a mask-based path lets each sequence attend to the ones before it
#   packing         packed rows of a model whose forward mixes packed sequences however attention runs
ATTENTION_SUPPORT: dict[str, frozenset[str]] = {
    "eager": frozenset({"sliding_window", "softcap", "sinks", "bidirectional", "chunked", "no_sdpa"}),
    "sdpa": frozenset({"sliding_window", "bidirectional", "chunked"}),
    SDPA_PACKED: frozenset({"sliding_window", "mask_packing"}),
    EAGER_PACKED: frozenset({"sliding_window", "softcap", "sinks", "no_sdpa", "mask_packing"}),
    "flash_attention_2": frozenset({"sliding_window", "softcap", "no_sdpa"}),
    # torch >= 2.11 takes a window (window_size); 2.10 only is_causal (_varlen_signature)
    TORCH_VARLEN: frozenset({"no_sdpa", "mask_packing"}),
}
# Found by feeding two packed sequences through eager attention in transformers 5.23 (the second one's
# log-probs changed); tests/test_attention.py checks gpt_oss. Their masks ignore position_ids; the
# per-sequence paths find the sequences themselves and pass the same test for gpt_oss.
_MASKS_WITHOUT_POSITION_IDS = frozenset({"gpt_oss"})
# Same finding, but not checked with a per-sequence path (positions or state also cross sequences:
# learned or ALiBi positions, Mamba layers): packing is refused for them.
_NO_PACKING = frozenset({"afmoe", "biogpt", "bloom", "falcon", "granitemoehybrid", "mpt", "opt", "xglm"})


def _model_class(config):
    """The causal-LM class transformers would build for `config`, or None (remote code)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def attention_features(config, *, packing: bool, model: torch.nn.Module | None = None) -> dict[str, str]:
    """The attention features `config`'s model asks for, each with the setting that asks (for messages).

    Sinks are parameters, seen only on modules: on `model` when given, else on a meta-device instance of
    the model's class (no memory, no weights; skipped for remote code, which the check after the load
    covers)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found: dict[str, str] = {}
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or []
    if (
        window is not None
        and getattr(text, "use_sliding_window", True) is not False
        and (not layer_types or "sliding_attention" in layer_types)
    ):
        found["sliding_window"] = f"sliding_window={window}"
    if getattr(text, "attn_logit_softcapping", None) is not None:
        found["softcap"] = f"attn_logit_softcapping={text.attn_logit_softcapping}"
    if getattr(text, "use_bidirectional_attention", False) or getattr(text, "is_causal", True) is False:
        found["bidirectional"] = "use_bidirectional_attention=true"
    if getattr(text, "attention_chunk_size", None) is not None:
        found["chunked"] = f"attention_chunk_size={text.attention_chunk_size}"
    cls = _model_class(config)
    if cls is not None and not getattr(cls, "_supports_sdpa", True):
        found["no_sdpa"] = f"{cls.__name__} (transformers has no sdpa path for it)"
    model_type = getattr(text, "model_type", "")
    if packing and model_type in _MASKS_WITHOUT_POSITION_IDS:
        found["mask_packing"] = (
            f"data.packing=true (transformers builds {model_type}'s attention masks without position_ids, so "
            "packed sequences would attend to each other)"
        )
    if packing and model_type in _NO_PACKING:
        found["packing"] = f"data.packing=true (transformers' {model_type} mixes packed sequences)"
    if model is None and cls is not None:
        with torch.device("meta"):
            model = cls(copy.deepcopy(config))
    if model is not None:
        sinks = [name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] == "sinks"]
        if sinks:
            found["sinks"] = f"attention sinks ({sinks[0]}, ...)"
    return found


def _flash_available(device_type: str) -> bool:
    return device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _varlen_signature() -> tuple | None:
    """torch's varlen_attn, whether it takes window_size (torch >= 2.11; 2.10 has is_causal instead)
    and enable_gqa; None before torch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params


if (_varlen_signature() or (None, False))[1]:
    ATTENTION_SUPPORT[TORCH_VARLEN] = ATTENTION_SUPPORT[TORCH_VARLEN] | {"sliding_window"}

# What `auto` tries, in order: kernels over the whole packed row first, then the per-sequence loops.
AUTO_ORDER = {
    True: (TORCH_VARLEN, "flash_attention_2", SDPA_PACKED, EAGER_PACKED),
    False: ("flash_attention_2", "sdpa", "eager"),
}
_KERNELS = (TORCH_VARLEN, "flash_attention_2")


def _cannot_run(name: str, device_type: str, dtype: torch.dtype | None, head_dim: int | None):
    """Why `name` cannot run here: ("missing", why) when this machine lacks it (CUDA, the package, the
    torch release), ("routed", why) when the kernel lacks this dtype, GPU generation or head size;
    None when it runs. A None dtype or head_dim is not checked."""
    if name not in _KERNELS:
        return None
    if device_type != "cuda":
        return "missing", "needs CUDA"
    if name == TORCH_VARLEN and _varlen_signature() is None:
        return "missing", f"needs torch >= 2.10 (torch.nn.attention.varlen; this is {torch.__version__})"
    if name == "flash_attention_2" and not _flash_available(device_type):
        return "missing", "needs the flash-attn package (pip install flash-attn, or -e '.[gpu]')"
    if dtype is not None and dtype not in HALF_DTYPES:
        return "routed", f"runs float16/bfloat16 only, not {str(dtype).removeprefix('torch.')}"
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else (8, 0)
    if capability < (8, 0):
        return "routed", f"needs compute capability 8.0 or later (this GPU: {capability[0]}.{capability[1]})"
    if head_dim is not None and (head_dim % 8 or head_dim > 256):
        return "routed", f"needs a head size that is a multiple of 8 up to 256 (this model: {head_dim})"
    return None


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    name: str  # the implementation the model is built with
    reason: str  # why: logged at start-up and as the run.attn_reason parameter


def _head_dim(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    size = getattr(text, "head_dim", None) or (heads and getattr(text, "hidden_size", 0) // heads)
    return int(size) if size else None


def choose_attention(
    requested: str,
    device_type: str,
    model_config,
    *,
    packing: bool = True,
    source: str = "the model",
    dtype: torch.dtype | None = None,
) -> AttentionChoice:
    """The attention implementation for `model_config`'s model, and why.

    auto: the first of AUTO_ORDER (packed: torch_varlen, flash_attention_2, sdpa_packed, eager_packed;
    padded: flash_attention_2, sdpa, eager) that runs on this device with `dtype` and applies every
    feature of the model (attention_features). An explicit kernel this machine lacks (CUDA, flash-attn,
    torch >= 2.10) is refused; one that lacks the dtype, GPU generation or head size is routed to the
    first per-sequence path that applies the model's features (float32 on a GPU: sdpa_packed), never
    left to fail inside the kernel. Every choice is checked (check_attention)."""
    features = attention_features(model_config, packing=packing)
    head_dim = _head_dim(model_config)
    order = AUTO_ORDER[packing]
    if requested == TORCH_VARLEN and not packing:
        raise ConfigError(
            "model.attn_implementation: torch_varlen attends within packed rows; set data.packing=true "
            "or use flash_attention_2, sdpa or eager"
        )
    if requested == "auto":
        skipped = []
        for name in order:
            blocked = _cannot_run(name, device_type, dtype, head_dim)
            missing = sorted(features.keys() - ATTENTION_SUPPORT[name])
            if blocked is None and not missing:
                notes = f"; skipped {'; '.join(skipped)}" if skipped else ""
                return _chosen(name, features, source, device_type, f"auto: {name}{notes}")
            skipped.append(f"{name} ({blocked[1] if blocked else 'does not apply ' + ', '.join(missing)})")
        fallback = next(n for n in order if _cannot_run(n, device_type, dtype, head_dim) is None)
        return _chosen(fallback, features, source, device_type, "auto")  # refused: no path applies all
    blocked = _cannot_run(requested, device_type, dtype, head_dim)
    if blocked is not None and blocked[0] == "missing":
        raise ConfigError(
            f"model.attn_implementation: {requested} {blocked[1]}; use auto, "
            f"{', '.join(n for n in (*AUTO_ORDER[True], 'sdpa', 'eager') if n != requested)}"
        )
    if blocked is not None:
        paths = [n for n in order if n not in _KERNELS]
        routed = next((n for n in paths if features.keys() <= ATTENTION_SUPPORT[n]), paths[0])
        return _chosen(routed, features, source, device_type, f"{requested} {blocked[1]}: routed to {routed}")
    return _chosen(requested, features, source, device_type, f"{requested}: as configured")


def _chosen(name: str, features: dict, source: str, device_type: str, reason: str) -> AttentionChoice:
    check_attention(name, features, source, device_type)
    if name in (SDPA_PACKED, EAGER_PACKED, TORCH_VARLEN):
        _register_packed()
    return AttentionChoice(name, reason)


def check_attention(attn: str, features: dict[str, str], source: str, device_type: str = "cpu") -> None:
    """The one rule: `attn` must apply every feature the model asks for (ConfigError naming them)."""
    if attn not in ATTENTION_SUPPORT:
        raise ConfigError(
            f"model.attn_implementation: {attn} is not declared in "
            "hdpo_ds.runtime.attention.ATTENTION_SUPPORT"
        )
    missing = [name for name in features if name not in ATTENTION_SUPPORT[attn]]
    if not missing:
        return
    usable = [
        name
        for name, supported in ATTENTION_SUPPORT.items()
        if features.keys() <= supported and (name != "flash_attention_2" or _flash_available(device_type))
    ]
    advice = f"use {' or '.join(usable)}" if usable else "no attention implementation here applies it"
    if not usable and features.keys() & {"mask_packing", "packing"}:
        advice = "set data.packing=false (padded rows with an attention mask)"
    raise ConfigError(
        f"model.attn_implementation: {attn} does not apply {'; '.join(features[m] for m in missing)} "
        f"of {source}; {advice}"
    )


_BOUNDARY_KWARGS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}


def check_packed_forward(model: torch.nn.Module, source: str) -> None:
    """Packed rows hand their boundaries to the model as keyword arguments (cu_seq_lens_q/k,
    max_length_q/k: `PackedBatch.model_inputs`), to the causal LM and to its decoder (the fused head).
    A forward that takes neither **kwargs nor all four names (some remote code) would fail at the first step
    with a TypeError deep in the model; refuse it at load time instead, naming the key."""
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    for module in (model,) if decoder is None else (model, decoder):
        params = inspect.signature(module.forward).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()) or params.keys() >= _BOUNDARY_KWARGS:
            continue
        raise ConfigError(
            f"data.packing: {type(module).__name__}.forward of {source} takes neither **kwargs nor all of "
            f"{', '.join(sorted(_BOUNDARY_KWARGS))}, so a packed row's sequence boundaries cannot reach its "
            "attention; set data.packing=false (padded rows with an attention mask)"
        )


def _sequence_starts(kwargs: dict, length: int, name: str) -> list[int]:
    """Row offsets where the sequences start, plus the row length: the collator's (the host copy on
    cu_seq_lens_q, `PackedBatch.model_inputs`), else read from position_ids (== 0): a host sync."""
    offsets = getattr(kwargs.get("cu_seq_lens_q"), "host_offsets", None)
    if offsets:
        if offsets[-1] != length:
            raise ValueError(f"{name} attention: the boundaries end at {offsets[-1]}, the row has {length}")
        return list(offsets)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError(f"{name} attention needs position_ids (call the model with them)")
    if position_ids.shape[0] > 1 and not bool((position_ids == position_ids[:1]).all()):
        raise ValueError(f"{name} attention needs the same sequence boundaries on every row")
    return [*torch.nonzero(position_ids[0] == 0)[:, 0].tolist(), length]


def _allowed(n: int, window: int | None, device) -> torch.Tensor | None:
    """(n, n) bool, True where query i may see key j: causal, within the last `window` keys (i - window
    < j <= i, transformers' sliding_window_overlay); None when the window covers the whole sequence."""
    if window is None or n <= window:
        return None
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & (j > i - window)


def _refuse_runtime(module, name: str, kwargs: dict, unsupported: tuple[str, ...]) -> None:
    """The backstop for models the config check cannot see into (remote code): never drop a feature."""
    given = [key for key in unsupported if kwargs.get(key) is not None]
    if given or getattr(module, "is_causal", True) is False:
        raise ValueError(
            f"{name} attention was called with {given or 'is_causal=False'} by {type(module).__name__}, "
            "which it does not apply; set model.attn_implementation=eager"
        )


def _sdpa_per_sequence(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs
):
    """Causal sdpa on each sequence of a packed row instead of one dense block-diagonal mask over it.

    query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D), as transformers' attention functions.
    Sequences start where position_ids are 0; the cost is the sum of squared sequence lengths rather
    than the square of the row length. A sequence longer than `sliding_window` gets an explicit banded
    causal mask. Right-padded rows (the padded mode) are one sequence each: under a causal mask real
    tokens never see the padding after them, and padding positions carry no label.
    """
    _refuse_runtime(module, SDPA_PACKED, kwargs, ("softcap", "s_aux"))
    starts = _sequence_starts(kwargs, query.shape[2], SDPA_PACKED)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    outs = []
    for a, b in itertools.pairwise(starts):
        if b <= a:
            continue
        mask = _allowed(b - a, sliding_window, query.device)
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, a:b],
                key[:, :, a:b],
                value[:, :, a:b],
                attn_mask=mask,
                is_causal=mask is None,
                scale=scaling,
                enable_gqa=gqa,
                dropout_p=p,
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _eager_per_sequence(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    sliding_window=None,
    softcap=None,
    s_aux=None,
    **kwargs,
):
    """Eager attention math on each sequence of a packed row: softcapping and sinks, which no sdpa
    kernel applies, at the cost of the sum of squared sequence lengths.

    Shapes as _sdpa_per_sequence. Per sequence of n tokens: logits q·kᵀ·scaling (B, H, n, n), then
    softcap·tanh(logits / softcap) (Gemma-2), the causal (banded) mask, a sink column per head
    appended (gpt-oss; it takes probability mass and is dropped), softmax in float32, dropout, ·v.
    """
    _refuse_runtime(module, EAGER_PACKED, kwargs, ())
    starts = _sequence_starts(kwargs, query.shape[2], EAGER_PACKED)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    outs = []
    for a, b in itertools.pairwise(starts):
        if b <= a:
            continue
        n = b - a
        logits = torch.matmul(query[:, :, a:b], key[:, :, a:b].transpose(2, 3)) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        allowed = _allowed(n, sliding_window, query.device)
        if allowed is None:
            allowed = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        logits = logits.float().masked_fill(~allowed, torch.finfo(torch.float32).min)
        if s_aux is not None:
            sink = s_aux.float().reshape(1, -1, 1, 1).expand(logits.shape[0], -1, n, 1)
            logits = torch.cat([logits, sink], dim=-1)
        probs = torch.softmax(logits, dim=-1)
        if s_aux is not None:
            probs = probs[..., :-1]
        probs = F.dropout(probs, p=dropout, training=module.training).to(value.dtype)
        outs.append(torch.matmul(probs, value[:, :, a:b]))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _varlen_packed(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs
):
    """torch's variable-length flash attention (torch.nn.attention.varlen) over a whole packed row.

    Shapes as _sdpa_per_sequence, B == 1. The boundaries are the collator's cu_seq_lens_q and
    max_length_q (`PackedBatch.model_inputs`): one kernel per layer, no host sync; a caller without
    them pays one, reading position_ids. Causal; a window keeps keys i - window < j <= i (left size
    window - 1, as transformers' flash path)."""
    _refuse_runtime(module, TORCH_VARLEN, kwargs, ("softcap", "s_aux"))
    if dropout and module.training:
        raise ValueError(
            f"torch_varlen applies no attention dropout ({dropout} in {type(module).__name__}); set "
            "model.disable_dropout=true or model.attn_implementation=sdpa_packed"
        )
    varlen_attn, windowed, gqa = _varlen_signature()
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if batch != 1:
        raise ValueError(f"torch_varlen attention needs one packed row per micro-batch, got {batch} rows")
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or longest is None:
        offsets = _sequence_starts(kwargs, length, TORCH_VARLEN)
        cu = torch.tensor(offsets, dtype=torch.int32)
        longest = max(b - a for a, b in itertools.pairwise(offsets))
    cu = cu.to(query.device, torch.int32, non_blocking=True)  # a no-op for the collator's moved tensor
    q = query.transpose(1, 2).reshape(length, heads, dim)
    k = key.transpose(1, 2).reshape(length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(length, kv_heads, dim)
    options: dict = {"scale": scaling}
    if kv_heads != heads:
        if gqa:
            options["enable_gqa"] = True
        else:
            groups = heads // kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if windowed:
        options["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
    elif sliding_window is not None and longest > sliding_window:
        raise ValueError(f"torch {torch.__version__}'s varlen_attn has no window; use sdpa_packed")
    else:
        options["is_causal"] = True
    out = varlen_attn(q, k, v, cu, cu, int(longest), int(longest), **options)
    return out.reshape(1, length, heads, dim), None


def _register_packed() -> None:
    from transformers import AttentionInterface

    for name, function in (
        (SDPA_PACKED, _sdpa_per_sequence),
        (EAGER_PACKED, _eager_per_sequence),
        (TORCH_VARLEN, _varlen_packed),
    ):
        # No mask function registered: transformers then builds no mask and skips its own packed-row
        # detection (a host sync per forward); the attention function keeps the sequences apart itself.
        AttentionInterface.register(name, function)


def select_attention(requested: str, device_type: str, model_config, **options) -> str:
    """The name `choose_attention` picks (its reason dropped); `options` as `choose_attention`'s."""
    return choose_attention(requested, device_type, model_config, **options).name


# Float attributes through which transformers' modules apply dropout functionally (no nn.Dropout module),
# e.g. the attention classes' `attention_dropout`, read in forward when the module is in train mode.
