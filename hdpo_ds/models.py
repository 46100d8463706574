"""Load the policy and the reference: attention implementation, dtype, gradient checkpointing.

Loading is offline (a local directory, or a hub id already in the local cache). Under ZeRO-3 the
caller first activates `engine.zero3_loading(ds_config)`, so transformers builds the model inside
`deepspeed.zero.Init` and a large model is never whole on one rank; this module itself knows nothing
of DeepSpeed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

from hdpo_ds.config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "check_model_source",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "select_attention",
]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    attn_implementation: str


def select_attention(requested: str, device_type: str) -> str:
    """flash_attention_2 where the package is installed and the device is CUDA, else sdpa."""
    if requested != "auto":
        if requested == "flash_attention_2" and (
            device_type != "cuda" or importlib.util.find_spec("flash_attn") is None
        ):
            raise ConfigError(
                "model.attn_implementation: flash_attention_2 needs CUDA and the flash-attn package "
                "(pip install -e '.[gpu]'); use auto, sdpa or eager"
            )
        return requested
    if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


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
) -> LoadedModel:
    """Build or load one causal LM. `name_or_path` overrides cfg.name_or_path (the reference)."""
    from transformers import AutoModelForCausalLM

    source = name_or_path or cfg.name_or_path
    attn = select_attention(cfg.attn_implementation, device_type)
    common = {"trust_remote_code": cfg.trust_remote_code, "attn_implementation": attn}
    if cfg.from_scratch and not name_or_path:
        config = load_model_config(cfg)
        # Every rank seeds identically, so a from-scratch model starts from the same weights everywhere.
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common)
    model.config.use_cache = False
    if for_training and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logger.info("loaded %s (%s, attention %s)", source, dtype, attn)
    return LoadedModel(model=model, attn_implementation=attn)
