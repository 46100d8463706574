"""DeepSpeed engines: the ds_config "auto" filling, the ZeRO-3 policy engine and the reference engine.

With the rest of runtime/ and tools/, the only modules that import deepspeed. A step is
`train.pairs_per_step` pairs packed into token-budget micro-batches; DeepSpeed counts samples, so its
batch keys are fixed to one "sample" (micro-batch) per rank and accumulation step, and the trainer
marks the accumulation boundary itself (docs/design.md §5).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from hdpo_ds.config import Config, ConfigError
from hdpo_ds.runtime import dist

logger = logging.getLogger(__name__)

__all__ = [
    "apply_optimizer_settings",
    "build_policy_engine",
    "build_reference_engine",
    "fill_ds_config",
    "full_gradients",
    "init_distributed",
    "load_ds_config",
    "local_all_finite",
    "mark_moe_leaves",
    "moe_blocks",
    "paired_parameters",
    "resolve_dtype",
    "sync_reference",
    "zero3_auto_sizes",
    "zero3_loading",
]


def load_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--ds: no such DeepSpeed config {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds: {path} is not valid JSON: {e}") from None


def resolve_dtype(cfg: Config, ds_config: dict, *, bf16_capable: bool | None = None) -> torch.dtype:
    """The training dtype: model.dtype when set, else the ds_config's bf16/fp16 switch, else bf16 on
    GPUs that support it and float32 on CPU (where exact comparisons in tests need float32).
    `bf16_capable` answers for a device other than this machine's (the dry run plans for GPUs)."""
    names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if cfg.model.dtype != "auto":
        return names[cfg.model.dtype]
    if ds_config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    if bf16_capable is None:
        bf16_capable = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_capable else torch.float32


def zero3_auto_sizes(hidden_size: int) -> dict[str, int]:
    """ZeRO-3 bucket sizes for "auto", from the hidden size (as transformers' integration does)."""
    return {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


def _set_auto(section: dict, key: str, value: Any, path: str) -> None:
    """Fill `key` when it is "auto" or absent; an explicit value that disagrees is an error."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(
            f"ds_config.{path}: {current!r} conflicts with the run config, which needs {value!r}"
        )


def fill_ds_config(
    ds_config: dict,
    cfg: Config,
    *,
    world_size: int,
    device_type: str,
    hidden_size: int | None = None,
    training: bool = True,
    dtype: torch.dtype | None = None,
) -> dict:
    """Return a copy of `ds_config` with every "auto" value filled from the run config.

    This is the one place that maps our run config onto DeepSpeed's keys:
    - batch keys: one micro-batch per rank per DeepSpeed "step", gradient_accumulation_steps 1; the
      trainer sets the accumulation boundary on each rank's last micro-batch of an optimizer step;
    - optimizer lr / betas / eps / weight_decay from `optim.*`; gradient_clipping from
      `optim.max_grad_norm`. Adam / AdamW run as torch's AdamW (`torch_adam: true`) on every device:
      DeepSpeed's FusedAdam JIT-compiles with nvcc on first use. An explicit `optimizer.params.torch_adam`
      is kept (false: FusedAdam), and an offloaded optimizer keeps DeepSpeed's CPU Adam (`adam_w_mode`
      only picks Adam or AdamW, which torch's path honours too);
    - bf16 / fp16 from `dtype`: the policy's resolved dtype (resolve_dtype of this config when None, for
      the policy only). The reference (training=False) must be given the policy's dtype, so that both
      models run in one dtype; an explicit reference bf16/fp16 switch that disagrees is a ConfigError;
      under bf16, the policy's gradients accumulate in fp32 (data_types.grad_accum_dtype; an explicit
      other value is kept and logged);
    - for the reference (training=False), ZeRO-3 parameter offload to CPU when reference.offload;
    - ZeRO-3 bucket sizes from the hidden size, as transformers' integration does.
    A key that is still "auto" afterwards, or a value that contradicts the run config, raises
    ConfigError naming the ds_config key.
    """
    data_parallel = max(world_size // cfg.train.sequence_parallel, 1)  # a sequence-parallel group: one share
    if cfg.train.pairs_per_step % data_parallel:
        groups = "" if data_parallel == world_size else f" / train.sequence_parallel = {data_parallel}"
        raise ConfigError(
            f"train.pairs_per_step: {cfg.train.pairs_per_step} is not divisible by the "
            f"world size {world_size}{groups}"
        )
    ds = copy.deepcopy(ds_config)
    _set_auto(ds, "train_micro_batch_size_per_gpu", 1, "train_micro_batch_size_per_gpu")
    _set_auto(ds, "gradient_accumulation_steps", 1, "gradient_accumulation_steps")
    _set_auto(ds, "train_batch_size", world_size, "train_batch_size")

    if dtype is None:
        if not training:
            raise ValueError("fill_ds_config: the reference's ds_config needs the policy's dtype (dtype=...)")
        dtype = resolve_dtype(cfg, ds_config)
    for key, wanted in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted
        elif section["enabled"] != wanted and not training:
            raise ConfigError(
                f"reference.ds_config: {key}.enabled={section['enabled']} conflicts with the policy's dtype "
                f"{str(dtype).removeprefix('torch.')} (the reference runs in the policy's dtype; "
                'set it to "auto")'
            )
        elif section["enabled"] != wanted:
            raise ConfigError(
                f"ds_config.{key}.enabled: {section['enabled']} conflicts with model.dtype={dtype}"
            )

    if dtype == torch.bfloat16 and training:
        # DeepSpeed accumulates in the model dtype unless told otherwise: 10-30 packed micro-batches
        # summed with an 8-bit mantissa are no longer the mean over the step's pairs.
        data_types = ds.setdefault("data_types", {})
        if data_types.get("grad_accum_dtype", "auto") == "auto":
            data_types["grad_accum_dtype"] = "fp32"
        elif data_types["grad_accum_dtype"] != "fp32":
            logger.warning(
                "ds_config.data_types.grad_accum_dtype=%s: gradients of a step's micro-batches "
                "are summed in that dtype, as the DeepSpeed config asks",
                data_types["grad_accum_dtype"],
            )

    if "scheduler" in ds:
        raise ConfigError(
            "ds_config.scheduler: remove it; the learning-rate schedule comes from optim.schedule"
        )
    if training:
        optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
        params = optimizer.setdefault("params", {})
        for key, value in (
            ("lr", cfg.optim.lr),
            ("betas", list(cfg.optim.betas)),
            ("eps", cfg.optim.eps),
            ("weight_decay", cfg.optim.weight_decay),
        ):
            _set_auto(params, key, value, f"optimizer.params.{key}")
        if optimizer.get("type", "").lower() in ("adam", "adamw"):
            zero = ds.get("zero_optimization", {})
            offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
            if not offloaded:
                params.setdefault("torch_adam", True)  # no compiled op (FusedAdam: nvcc at first use)
        _set_auto(ds, "gradient_clipping", cfg.optim.max_grad_norm, "gradient_clipping")
    else:
        if "optimizer" in ds:
            raise ConfigError("ds_config.optimizer: the reference engine takes no optimizer; remove it")
        ds.pop("gradient_clipping", None)
        if cfg.reference.offload:  # the reference engine's parameters live in CPU memory between uses
            ds.setdefault("zero_optimization", {})["offload_param"] = {"device": "cpu", "pin_memory": True}

    zero = ds.get("zero_optimization", {})
    if hidden_size:
        for key, value in zero3_auto_sizes(hidden_size).items():
            if zero.get(key) == "auto":
                zero[key] = value
    for key in ("offload_param", "offload_optimizer"):
        section = zero.get(key)
        if isinstance(section, dict) and section.get("device") not in (None, "none") and device_type == "cpu":
            section["pin_memory"] = False  # no pinned host memory without an accelerator

    _reject_leftover_auto(ds)
    return ds


def _reject_leftover_auto(node: Any, path: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _reject_leftover_auto(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _reject_leftover_auto(value, f"{path}[{i}]")
    elif node == "auto":
        raise ConfigError(f"ds_config.{path}: 'auto' is not a value hdpo_ds can fill; set it explicitly")


def init_distributed(timeout_minutes: float = 60.0) -> None:
    """Join the process group (gloo on CPU, nccl on GPUs); DeepSpeed picks the backend. A collective
    that waits longer than `timeout_minutes` for the slowest rank fails (train.dist_timeout_minutes)."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu" and accelerator.device_count() > 0:
        # A rank sees every GPU of its node (srun task, deepspeed launcher): take its own before the first
        # collective and before current_device() is asked, or every rank would use (and NCCL bind) GPU 0.
        accelerator.set_device(dist.local_rank() % accelerator.device_count())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    deepspeed.init_distributed(dist_backend=None, verbose=False, timeout=timeout)
    _unlink_shm_allreduce_buffer()


def shm_allreduce_buffer_path() -> str:
    """The shared-memory segment DeepSpeed's CPU allreduce creates for this rank (shm.cpp's name:
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>); DeepSpeed never unlinks it."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.rank()}"


def _unlink_shm_allreduce_buffer() -> None:
    """Each launch would otherwise leave 64 MiB per rank in /dev/shm for good (226 files, 15 GiB, seen
    after a day of test runs). Once every rank has mapped every segment (done in init, so after a
    barrier), unlinking the names frees the memory when the processes end, even on SIGKILL."""
    if dist.world_size() < 2:
        return
    dist.barrier()  # unconditional: a rank-dependent collective could hang
    # absent on GPU runs and multi-node runs (DeepSpeed uses shm only when all ranks are local)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_allreduce_buffer_path())


def device_type() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def current_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, get_accelerator().current_device())


def zero3_loading(ds_config: dict):
    """Make transformers build or load the next model straight into ZeRO-3 partitions.

    Returns the HfDeepSpeedConfig handle (the caller keeps it referenced while loading), or None when
    the config is not ZeRO stage 3. With it, `from_pretrained` / `from_config` run inside
    `deepspeed.zero.Init`, so a large model is never whole on one rank.
    """
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def moe_blocks(model: torch.nn.Module) -> list[type]:
    """The classes of a mixture of experts' sparse blocks in `model`: modules with an `experts` child and
    a router (a `gate` or `router` child), as transformers 5 builds Mixtral, Qwen-MoE, OLMoE, DeepSeek,
    gpt-oss. In module order, each class once."""
    classes: list[type] = []
    for module in model.modules():
        children = {name for name, _ in module.named_children()}
        if "experts" in children and children & {"gate", "router"} and type(module) not in classes:
            classes.append(type(module))
    return classes


def mark_moe_leaves(model: torch.nn.Module, ds_config: dict, enabled: bool) -> list[str]:
    """model.moe_leaf_modules under ZeRO-3: mark every sparse block a ZeRO-3 leaf module (DeepSpeed's
    `set_z3_leaf_modules`), so its router and stacked experts are gathered in one fetch with one hook pair
    instead of one per child. Before deepspeed.initialize. Returns the marked class names."""
    if not enabled or ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return []
    classes = moe_blocks(model)
    if not classes:
        raise ConfigError(
            "model.moe_leaf_modules: true, but the model has no mixture-of-experts block (a module with "
            "`experts` and a `gate` or `router`); set it false"
        )
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


def build_policy_engine(model: torch.nn.Module, ds_config: dict, lr_lambda: Callable[[int], float]):
    """The ZeRO training engine; `lr_lambda(step)` multiplies optim.lr (warmup and decay)."""
    import deepspeed

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=scheduler,
    )
    return engine


def build_reference_engine(model: torch.nn.Module, ds_config: dict):
    """A DeepSpeed engine without optimizer, in eval mode, parameters frozen."""
    import deepspeed

    model.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def full_gradients(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full (gathered) gradient, on CPU in float32. Collective: all ranks call it.

    Valid after the last backward of an optimizer step and before `engine.step()`.
    """
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param)
        if grad is not None:
            grads[name] = grad.detach().float().cpu().clone()
    return grads


def _local_partitions(engine, kind: str):
    """This rank's share of every trainable parameter's gradient ("grad") or weights ("weight"): the
    ZeRO-3 partition where the parameter is partitioned, else the whole tensor (every rank visits the
    parameters in the same order, as safe_get_full_grad may be collective under ZeRO 1-2)."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    for param in engine.module.parameters():
        if not param.requires_grad:
            continue
        if kind == "weight":
            yield param.ds_tensor if hasattr(param, "ds_tensor") else param.data
        elif hasattr(param, "ds_id"):
            yield safe_get_local_grad(param)
        else:  # ZeRO 0-2 keep the reduced gradient in the optimizer's buffers, not in param.grad
            yield safe_get_full_grad(param)


def local_all_finite(engine, kind: str, device: torch.device) -> torch.Tensor:
    """A bool tensor on `device` (no host sync): whether this rank's gradient partitions (kind="grad",
    valid after a step's last backward, before `engine.step()`) or weight partitions (kind="weight")
    hold only finite numbers. Ranks agree on it with one collective (dist.all_agree)."""
    finite = torch.ones((), dtype=torch.bool, device=device)
    for part in _local_partitions(engine, kind):
        if part is not None and part.numel():
            finite &= torch.isfinite(part).all().to(device)
    return finite


def apply_optimizer_settings(engine, lr: float, betas: list[float], eps: float, weight_decay: float) -> None:
    """After a resume with train.resume_force: make the restored optimizer use the run config's optim.*
    values (the checkpoint's optimizer state holds the old ones). The schedule multiplies the new lr."""
    for group in engine.optimizer.param_groups:
        group.update(betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    # The rate of the step about to run: LambdaLR's factor at its current count, on the new base.
    for group, factor in zip(engine.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = lr * factor(scheduler.last_epoch)


def discard_gradients(policy) -> None:
    """Drop the step's accumulated gradients without an optimizer update (a skipped step).

    As DeepSpeed does after its own update: the ZeRO optimizer's zero_grad also resets its micro-step
    count, so the next step's gradients start fresh instead of adding to these."""
    if hasattr(policy.optimizer, "zero_grad"):
        policy.optimizer.zero_grad()
    else:
        policy.zero_grad()


def paired_parameters(policy: torch.nn.Module, reference: torch.nn.Module):
    """The reference's parameters grouped by the module that owns them, each paired with the policy's
    parameter of the same name: [[(name, policy_param, reference_param), ...] per module]. A name or a
    whole shape (ZeRO-3's ds_shape, as a partitioned parameter's own shape is empty) that differs raises
    ConfigError: a moving reference needs the policy's architecture (reference.name_or_path)."""
    theirs = dict(policy.named_parameters())
    ours = dict(reference.named_parameters())
    if set(theirs) != set(ours):
        only_policy, only_ref = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        raise ConfigError(
            f"reference.sync: the reference's parameters are not the policy's (only in the policy: "
            f"{only_policy[:5]}, only in the reference: {only_ref[:5]}); a moving reference needs a "
            "reference.name_or_path of the policy's architecture"
        )
    groups = []
    for prefix, module in reference.named_modules():
        group = []
        for local, ref_param in module.named_parameters(prefix=prefix, recurse=False):
            if local not in ours or ours[local] is not ref_param:
                continue  # a tied weight: named_parameters lists it once, under its first name
            pol_param = theirs[local]
            shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in (pol_param, ref_param)]
            if shapes[0] != shapes[1]:
                raise ConfigError(
                    f"reference.sync: parameter {local} has shape {shapes[0]} in the policy and "
                    f"{shapes[1]} in the reference (reference.name_or_path); they cannot be mixed"
                )
            group.append((local, pol_param, ref_param))
        if group:
            groups.append(group)
    return groups


@torch.no_grad()
def sync_reference(policy_engine, reference_engine, alpha: float) -> None:
    """TR-DPO's reference update (Gorbatovski et al. 2024, arXiv:2404.09656, Sec. 3): every reference
    parameter becomes alpha * policy + (1 - alpha) * reference, computed in float32 and cast back to the
    reference's dtype; alpha = 1 (hard update) copies the policy's values exactly. Collective: every rank
    calls it at the same step (docs/design.md §5).

    One module's parameters are gathered at a time on each side (never a whole model): the policy's
    read-only, the reference's with modifier_rank=0, whose values DeepSpeed broadcasts and re-partitions on
    exit. The two engines need not partition alike (other persistence thresholds, offload, or no ZeRO-3:
    GatheredParameters passes plain tensors through, and every rank computes the same values for them)."""
    import deepspeed

    for group in paired_parameters(policy_engine.module, reference_engine.module):
        pol = [p for _, p, _ in group]
        ref = [r for _, _, r in group]
        with (
            deepspeed.zero.GatheredParameters(pol, modifier_rank=None),
            deepspeed.zero.GatheredParameters(ref, modifier_rank=0),
        ):
            for p, r in zip(pol, ref, strict=True):
                if alpha == 1.0:
                    r.data.copy_(p.data)
                else:
                    mixed = alpha * p.data.float() + (1.0 - alpha) * r.data.float()
                    r.data.copy_(mixed.to(r.dtype))
