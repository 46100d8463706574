"""Load the policy and the reference: attention implementation, dtype, gradient checkpointing.

Loading is offline (a local directory, or a hub id already in the local cache). Under ZeRO-3 the
caller first activates `engine.zero3_loading(ds_config)`, so transformers builds the model inside
`deepspeed.zero.Init` and a large model is never whole on one rank; this module itself knows nothing
of DeepSpeed.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hdpo_ds.config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "check_model_source",
    "disable_dropout",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "select_attention",
]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    attn_implementation: str


SDPA_PACKED = "sdpa_packed"


def _sdpa_per_sequence(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal sdpa on each sequence of a packed row instead of one dense block-diagonal mask over it.

    query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D), as transformers' attention functions.
    Sequences start where position_ids are 0; the cost is the sum of squared sequence lengths rather
    than the square of the row length. Right-padded rows (the padded mode) are one sequence each: under
    a causal mask real tokens never see the padding after them, and padding positions carry no label.
    """
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError("sdpa_packed attention needs position_ids (call the model with them)")
    if position_ids.shape[0] > 1 and not bool((position_ids == position_ids[:1]).all()):
        raise ValueError("sdpa_packed attention needs the same sequence boundaries on every row")
    starts = [*torch.nonzero(position_ids[0] == 0)[:, 0].tolist(), query.shape[2]]  # host sync, per layer
    gqa = query.shape[1] != key.shape[1]
    out = torch.cat(
        [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                        scale=scaling, enable_gqa=gqa, dropout_p=dropout if module.training else 0.0)
         for a, b in itertools.pairwise(starts) if b > a],
        dim=2,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def _register_sdpa_packed() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(SDPA_PACKED, _sdpa_per_sequence)
    # No mask is built at all: the attention function finds the sequences from position_ids.
    ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_PACKED, lambda *args, **kwargs: None)


def select_attention(requested: str, device_type: str, *, packing: bool = True) -> str:
    """auto: flash_attention_2 where flash-attn is installed and the device is CUDA (varlen kernels for
    packed rows); else, for packed micro-batches, sdpa_packed (per-sequence sdpa, registered here);
    else sdpa. An explicit choice is checked and kept."""
    if requested == "flash_attention_2" and (
        device_type != "cuda" or importlib.util.find_spec("flash_attn") is None
    ):
        raise ConfigError(
            "model.attn_implementation: flash_attention_2 needs CUDA and the flash-attn package "
            "(pip install flash-attn, or -e '.[gpu]'); use auto, sdpa_packed, sdpa or eager"
        )
    if requested == "auto":
        if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            requested = "flash_attention_2"
        else:
            requested = SDPA_PACKED if packing else "sdpa"
    if requested == SDPA_PACKED:
        _register_sdpa_packed()
    return requested


# Float attributes through which transformers' modules apply dropout functionally (no nn.Dropout module),
# e.g. the attention classes' `attention_dropout`, read in forward when the module is in train mode.
_DROPOUT_ATTRIBUTES = (
    "attention_dropout",
    "attn_dropout",
    "dropout",
    "dropout_p",
    "hidden_dropout",
    "activation_dropout",
    "resid_dropout",
)


_DROPOUT_MODULES = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def disable_dropout(model: torch.nn.Module) -> list[str]:
    """Set every dropout probability of the built model to 0 (modules and functional attributes), so
    that train mode computes what eval mode does. The config is left as it is (exports keep it).
    Returns what was changed, as sorted 'Class.attribute' names."""
    changed = set()
    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES) and module.p:
            module.p = 0.0
            changed.add(f"{type(module).__name__}.p")
        for attr in _DROPOUT_ATTRIBUTES:
            value = getattr(module, attr, None)
            if isinstance(value, float) and value:
                setattr(module, attr, 0.0)
                changed.add(f"{type(module).__name__}.{attr}")
    return sorted(changed)


def _is_local(path: str) -> bool:
    return os.path.exists(path)


def check_model_source(cfg: ModelConfig, key: str = "model.name_or_path") -> None:
    """Fail before any engine is built when the model cannot be found offline."""
    path = cfg.name_or_path
    if _is_local(path):
        config_file = path if path.endswith(".json") else os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise ConfigError(f"{key}: {path} has no config.json")
        return
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ConfigError(f"{key}: no such model directory {path}")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(path, "config.json"), str):
        raise ConfigError(
            f"{key}: {path!r} is neither a local directory nor a model in the local Hugging Face cache "
            "(models are loaded offline)"
        )


def _config_source(path: str) -> str:
    """A directory or hub id; a path to a config.json means its directory."""
    return (os.path.dirname(path) or ".") if path.endswith(".json") else path


def load_model_config(cfg: ModelConfig):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        _config_source(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code
    )


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = _config_source(cfg.tokenizer or cfg.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding only fills the padded mode and filler rows, which labels mask out.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    device_type: str,
    seed: int,
    name_or_path: str | None = None,
    for_training: bool = True,
    packing: bool = True,
) -> LoadedModel:
    """Build or load one causal LM. `name_or_path` overrides cfg.name_or_path (the reference)."""
    from transformers import AutoModelForCausalLM

    source = name_or_path or cfg.name_or_path
    attn = select_attention(cfg.attn_implementation, device_type, packing=packing)
    common = {"trust_remote_code": cfg.trust_remote_code, "attn_implementation": attn}
    if cfg.from_scratch and not name_or_path:
        config = load_model_config(cfg)
        # Every rank seeds identically, so a from-scratch model starts from the same weights everywhere.
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common)
    model.config.use_cache = False
    if cfg.disable_dropout:
        turned_off = disable_dropout(model)
        if turned_off:
            logger.info("model.disable_dropout: dropout set to 0 in %s", ", ".join(turned_off))
    if for_training and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logger.info("loaded %s (%s, attention %s)", source, dtype, attn)
    return LoadedModel(model=model, attn_implementation=attn)
