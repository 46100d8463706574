"""LoRA on the frozen base model, built with peft (docs/design.md §2, §4 LoRA).

The base model is built as always (inside `deepspeed.zero.Init` under ZeRO-3, runtime/models.py), then
wrapped by `wrap_model`: peft's `get_peft_model` with a `LoraConfig` from `model.lora`, or
`PeftModel.from_pretrained(..., is_trainable=True)` for `model.lora.init_adapter`. The base weights are
frozen (requires_grad False), so only the adapters and `modules_to_save` reach the optimizer
(runtime/engine.py `build_policy_engine` passes the trainable parameters alone); DeepSpeed partitions
the adapters, created after zero.Init, when the engine is built. `adapters_disabled` is the reference
of `reference.source: adapters_off`: the same network with its adapters switched off (peft's
`disable_adapter`), under no_grad and in eval mode. `export_adapter` writes the adapter in PEFT's own
format (collective under ZeRO-3: the trainable parameters are gathered, rank 0 writes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch

from hdpo_ds.config import ConfigError, LoraConfig
from hdpo_ds.runtime import dist

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_CONFIG",
    "adapted_layers",
    "adapters_disabled",
    "check_init_adapter",
    "export_adapter",
    "is_peft_model",
    "output_layer_adapted",
    "trainable_parameters",
    "wrap_model",
]

ADAPTER_CONFIG = "adapter_config.json"  # peft's CONFIG_NAME


def _read_adapter_config(path: str) -> dict:
    config_file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_file):
        raise ConfigError(
            f"model.lora.init_adapter: {path} holds no {ADAPTER_CONFIG} (a PEFT adapter folder)"
        )
    with open(config_file) as f:
        return json.load(f)


def check_init_adapter(lora: LoraConfig) -> None:
    """Before any engine: `model.lora.init_adapter` is a LoRA adapter folder whose configuration is the one
    model.lora states (r, alpha, dropout, target_modules unless all-linear, modules_to_save), so no key
    is silently overridden by the file. Each difference is named."""
    if not lora.init_adapter:
        return
    saved = _read_adapter_config(lora.init_adapter)
    if saved.get("peft_type") != "LORA":
        raise ConfigError(
            f"model.lora.init_adapter: {lora.init_adapter} holds a {saved.get('peft_type')} adapter, not LoRA"
        )
    theirs = {
        "r": saved.get("r"),
        "alpha": saved.get("lora_alpha"),
        "dropout": saved.get("lora_dropout"),
        "modules_to_save": sorted(saved.get("modules_to_save") or []),
    }
    ours = {
        "r": lora.r,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "modules_to_save": sorted(lora.modules_to_save),
    }
    if lora.target_modules != "all-linear":
        targets = saved.get("target_modules")
        theirs["target_modules"] = sorted(targets) if isinstance(targets, list) else targets
        ours["target_modules"] = sorted(lora.target_modules)
    wrong = [
        f"model.lora.{k}: {ours[k]!r} here, {theirs[k]!r} in the adapter"
        for k in ours
        if ours[k] != theirs[k]
    ]
    if wrong:
        raise ConfigError(
            f"model.lora.init_adapter: {lora.init_adapter} was trained with another LoRA configuration; set "
            "these keys to the adapter's values:\n  " + "\n  ".join(wrong)
        )


def _peft_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=list(lora.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _embedding_names(model: torch.nn.Module) -> dict[str, str]:
    """The module names of the input and the output embedding ({"input": ..., "output": ...})."""
    wanted = {"input": model.get_input_embeddings(), "output": model.get_output_embeddings()}
    names = {}
    for name, module in model.named_modules():
        for side, target in wanted.items():
            if module is target and side not in names:
                names[side] = name
    return names


def _matches(module_name: str, patterns) -> bool:
    """peft's rule for a list of names: the module's full name, or a dotted suffix of it."""
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def _check_tied_embeddings(model: torch.nn.Module, lora: LoraConfig) -> None:
    """A tied input and output embedding is one parameter: adapting or saving one side would train a copy
    the other side does not see (peft would untie them silently). Refused, naming the keys."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    names = _embedding_names(model)
    targets = [] if lora.target_modules == "all-linear" else lora.target_modules
    for key, patterns in (("target_modules", targets), ("modules_to_save", lora.modules_to_save)):
        hit = [n for n in names.values() if _matches(n, patterns)]
        if hit:
            raise ConfigError(
                f"model.lora.{key}: {hit[0]!r} is one of the model's tied embeddings "
                f"(tie_word_embeddings: true; input {names.get('input')!r}, output {names.get('output')!r}): "
                "adapting or saving it alone would untie them; leave the embeddings out"
            )


def wrap_model(model: torch.nn.Module, lora: LoraConfig, *, seed: int) -> torch.nn.Module:
    """The base model wrapped with LoRA adapters (a peft PeftModel); the base's parameters frozen.

    Every rank seeds identically first, so the adapters' random initialisation (peft: Kaiming-uniform A,
    zero B) is the same on every rank and in a one-process run. The adapters take the base's dtype
    (`autocast_adapter_dtype=False`): DeepSpeed keeps the optimizer's fp32 master copy itself."""
    from peft import PeftModel, get_peft_model

    _check_tied_embeddings(model, lora)
    torch.manual_seed(seed)
    if lora.init_adapter:
        wrapped = PeftModel.from_pretrained(
            model, lora.init_adapter, is_trainable=True, autocast_adapter_dtype=False
        )
        source = f"from {lora.init_adapter}"
    else:
        wrapped = get_peft_model(model, _peft_config(lora), autocast_adapter_dtype=False)
        source = "new (B = 0)"
    layers = adapted_layers(wrapped)
    if not layers:
        raise ConfigError(f"model.lora.target_modules: {lora.target_modules!r} matches no layer of the model")
    trainable = sum(_numel(p) for p in trainable_parameters(wrapped))
    total = sum(_numel(p) for p in wrapped.parameters())
    if dist.is_main_process():
        logger.info(
            "LoRA %s: r=%d, alpha=%g, dropout=%g on %d layers, modules_to_save %s; %d of %d parameters "
            "train (%.3f%%)",
            source,
            lora.r,
            lora.alpha,
            lora.dropout,
            len(layers),
            list(lora.modules_to_save) or "none",
            trainable,
            total,
            100.0 * trainable / max(1, total),
        )
    return wrapped


def _numel(param: torch.Tensor) -> int:
    return getattr(param, "ds_numel", param.numel())  # a ZeRO-3 partitioned parameter's full size


def is_peft_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapted_layers(model: torch.nn.Module) -> list[str]:
    """The names of the modules that carry a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def output_layer_adapted(model: torch.nn.Module) -> bool:
    """Whether the model's output layer carries an adapter or is a modules_to_save copy: then its
    logits are not lm_head.weight @ h (+ bias), which is all the fused head reads."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if not is_peft_model(model):
        return False
    base = model.get_base_model()
    head_name = _embedding_names(base).get("output")
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer | ModulesToSaveWrapper) and (
            name == head_name or (head_name or "").startswith(name + ".")
        ):
            return True
    return False


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_disabled(engine):
    """The base model: the policy engine's module with every adapter switched off (peft's public
    `disable_adapter`), in eval mode and without a graph; the previous mode is restored on exit.
    `engine` is the DeepSpeed engine (or the PeftModel itself); its forward runs the base model."""
    module = getattr(engine, "module", engine)
    training = module.training
    module.eval()
    try:
        with torch.no_grad(), module.disable_adapter():
            yield engine
    finally:
        module.train(training)


def export_adapter(engine, out_dir: str) -> None:
    """Write the adapter in PEFT's format (adapter_config.json, adapter_model.safetensors) to `out_dir`,
    loadable with `PeftModel.from_pretrained(base, out_dir)`. Collective under ZeRO-3: every rank
    gathers the trainable parameters (the adapters and modules_to_save: small), rank 0 writes."""
    import deepspeed

    model = engine.module
    # peft's save_pretrained reads the adapters (and modules_to_save copies) from the module itself: they
    # are whole on every rank inside the gather; the frozen base stays partitioned and is not saved.
    with deepspeed.zero.GatheredParameters(trainable_parameters(model), modifier_rank=None):
        if dist.is_main_process():
            os.makedirs(out_dir, exist_ok=True)
            model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
            logger.info("LoRA adapter written to %s", out_dir)
    dist.barrier()
