"""Load the policy and the reference: attention implementation, dtype, gradient checkpointing.

Loading is offline (a local directory, or a hub id already in the local cache). Under ZeRO-3 the
caller first activates `engine.zero3_loading(ds_config)`, so transformers builds the model inside
`deepspeed.zero.Init` and a large model is never whole on one rank; this module itself knows nothing
of DeepSpeed.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass

import torch

from hdpo_ds.config import ConfigError, ModelConfig
from hdpo_ds.runtime.attention import (
    attention_features,
    check_attention,
    check_packed_forward,
    choose_attention,
)

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "check_model_source",
    "config_for_saving",
    "disable_dropout",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "moe_routing",
]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    attn_implementation: str
    attn_reason: str = ""  # why this implementation (runtime/attention.py choose_attention)


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


_SAVED_CONFIG_VALUES = "_hdpo_saved_config_values"


def config_for_saving(model: torch.nn.Module):
    """A copy of `model.config` with the values load_model changed for training put back (use_cache),
    for the checkpoints' hf_config and the Hugging Face export."""
    config = copy.deepcopy(model.config)
    for key, value in getattr(model, _SAVED_CONFIG_VALUES, {}).items():
        setattr(config, key, value)
    return config


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
    """Build or load one causal LM. `name_or_path` overrides cfg.name_or_path (the reference). The
    attention implementation is checked against the model's config before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = name_or_path or cfg.name_or_path
    config = AutoConfig.from_pretrained(_config_source(source), trust_remote_code=cfg.trust_remote_code)
    choice = choose_attention(
        cfg.attn_implementation, device_type, config, packing=packing, source=source, dtype=dtype
    )
    attn = choice.name
    common = {"trust_remote_code": cfg.trust_remote_code, "attn_implementation": attn}
    if cfg.from_scratch and not name_or_path:
        # Every rank seeds identically, so a from-scratch model starts from the same weights everywhere.
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common)
    # Again on the built modules: remote-code models show their sinks only here.
    check_attention(attn, attention_features(model.config, packing=packing, model=model), source, device_type)
    if packing:
        check_packed_forward(model, source)
    # Generation wants the KV cache; training never does. Saved configs get the model's own value back.
    setattr(model, _SAVED_CONFIG_VALUES, {"use_cache": getattr(model.config, "use_cache", True)})
    model.config.use_cache = False
    if cfg.disable_dropout:
        turned_off = disable_dropout(model)
        if turned_off:
            logger.info("model.disable_dropout: dropout set to 0 in %s", ", ".join(turned_off))
    if for_training and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logger.info("loaded %s (%s, attention %s)", source, dtype, attn)
    return LoadedModel(model=model, attn_implementation=attn, attn_reason=choice.reason)


def moe_routing(model_config) -> tuple[int, float] | None:
    """(experts per token, the config's router_aux_loss_coef) of a mixture-of-experts model whose forward
    returns its router logits (`output_router_logits`: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss,
    ...), or None for a dense model or one without a load-balancing loss."""
    names = ("output_router_logits", "router_aux_loss_coef", "num_experts_per_tok")
    if not all(hasattr(model_config, name) for name in names):
        return None
    return int(model_config.num_experts_per_tok), float(model_config.router_aux_loss_coef)
