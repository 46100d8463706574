"""The run configuration: typed dataclasses with every default, YAML loading, dotted overrides.

    cfg = load_config("configs/demo.yaml", ["loss.alpha=0.9", "train.max_steps=10"])

An unknown key, a value of the wrong type, or an inconsistent combination raises `ConfigError`
naming the dotted key, before anything expensive is built. Key names that scripts and docs outside
the package rely on are listed in docs/design.md §3 and keep their names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from hdpo_ds.data.mixture import parse_rows, parse_sources
from hdpo_ds.monitoring.detectors import DETECTORS
from hdpo_ds.objectives.coupled import COUPLED_LOSS_TYPES
from hdpo_ds.objectives.losses import (
    ALPHA_LOSS_TYPES,
    DISCOPOP_DEFAULT_TAU,
    DPOP_DEFAULT_LAMBDA,
    EXO_DEFAULT_EPSILON,
    LABEL_SMOOTHING_LOSS_TYPES,
    LOSS_TYPES,
    TDPO_LOSS_TYPES,
    alpha_does_not_apply,
    canonical_loss_type,
)
from hdpo_ds.objectives.modifiers import SFT_TERM
from hdpo_ds.objectives.reference_free import REFERENCE_FREE_LOSS_TYPES

__all__ = [
    "Config",
    "ConfigError",
    "flatten",
    "load_config",
    "lora_adapts_output_layer",
    "lora_enabled",
    "loss_label",
    "loss_terms",
    "reference_source",
    "to_dict",
]


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the dotted key."""


@dataclass
class LoraConfig:
    """LoRA adapters on the frozen base model (runtime/lora.py, built with peft); off while r is 0."""

    r: int = 0  # the adapters' rank; 0: no LoRA, the whole model trains
    alpha: float = 16.0  # LoRA's scale is alpha / r (Hu et al. 2021, Sec. 4.1)
    dropout: float = 0.0  # the adapters' own dropout (model.disable_dropout leaves it as set)
    # module names (suffixes, as peft matches them) or "all-linear": every linear layer but the output one
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)  # whole modules trained beside the adapters
    init_adapter: str = ""  # a PEFT adapter directory to start from (its config must match these keys)


@dataclass
class ModelConfig:
    # A local directory or hub id loaded with AutoModelForCausalLM (offline), or, with from_scratch,
    # a directory (or config.json) whose config builds a randomly initialised model.
    name_or_path: str = ""
    tokenizer: str = ""  # default: name_or_path
    from_scratch: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: follows the ds_config
    attn_implementation: Literal[
        "auto", "torch_varlen", "flash_attention_2", "sdpa_packed", "eager_packed", "sdpa", "eager"
    ] = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # Dropout off in the policy (and the reference): otherwise the policy trains against an eval-mode
    # reference and DPO's rewards are not 0 at step 0 (TRL's default too).
    disable_dropout: bool = True
    # Mixture-of-experts models: the weight of the router's load-balancing loss added to the objective
    # (objectives/router.py); None: the model config's router_aux_loss_coef. Refused for a dense model.
    router_aux_loss_coef: float | None = None
    # Mixture-of-experts models under ZeRO-3: each sparse block (router + stacked experts) as one ZeRO-3
    # leaf module, gathered whole by one hook pair (runtime/engine.py mark_moe_leaves); off by default:
    # 7% slower on CPU (docs/benchmarks.md). A dense model refuses true.
    moe_leaf_modules: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ReferenceConfig:
    mode: Literal["online", "cached", "auto"] = "online"
    # What computes the reference online: its own engine, or the policy's engine with its LoRA adapters
    # disabled (no second model). auto: adapters_off under LoRA (model.lora.r > 0), else engine.
    source: Literal["auto", "engine", "adapters_off"] = "auto"
    name_or_path: str = ""  # default: the policy's initial weights
    ds_config: str = "ds_configs/zero3_infer.json"
    cache_path: str = ""  # cached: required; auto: default <output_dir>/reference_cache
    rebuild_stale: bool = False  # auto: rebuild a stale cache (logged) instead of stopping
    shard_pairs: int = 4096  # pairs per cache shard: the unit a killed precompute resumes from
    offload: bool = False  # ZeRO-3 parameter offload to CPU for the reference engine
    # A moving reference (TR-DPO, Gorbatovski et al. 2024): after every `sync_every` applied optimizer
    # updates the online reference becomes sync_alpha * policy + (1 - sync_alpha) * reference (soft) or a
    # copy of the policy (hard). Defaults as TRL's DPOConfig (ref_model_mixup_alpha, ref_model_sync_steps).
    sync: Literal["none", "soft", "hard"] = "none"
    sync_alpha: float = 0.6
    sync_every: int = 512


@dataclass
class DataConfig:
    # A path, or a mapping {path, weight, split, rows}: a weighted mixture (data/mixture.py)
    train_files: list[str | dict] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    split: str = ""
    rows: str = ""  # a row slice like "0:1000"
    eval_rows: str = ""
    max_length: int = 1024
    max_prompt_length: int = 512
    max_tokens_per_micro_batch: int = 4096
    truncation: Literal["keep_end", "keep_start", "drop"] = "keep_end"
    on_bad_record: Literal["error", "skip"] = "error"
    chat_template: str = ""  # a Jinja file, for tokenizers without a template
    packing: bool = True
    cache_dir: str = ""  # default: <output_dir>/cache
    num_proc: int = 0  # workers of the validate-and-tokenize pass on rank 0 (data/prepare.py); 0: one per CPU


@dataclass
class LossConfig:
    # One loss type, or a list of terms summed with `weights` (objectives/objective.py CombinedObjective)
    type: str | list[str] = "hdpo"
    weights: list[float] | None = None  # one per term of a list-valued type; default 1 each
    beta: float = 0.1
    # A number, or "auto": the AlphaController (hdpo_ds/monitoring/alpha.py) steers alpha so that the
    # per-token entropy of chosen responses approaches target_entropy, starting at alpha_init.
    alpha: float | Literal["auto"] = 1.0
    target_entropy: float = 0.0  # nats per chosen-response token; required with alpha=auto
    alpha_init: float = 1.0
    alpha_min: float = 0.5
    alpha_max: float = 2.0
    alpha_gain: float = 3.0  # proportional: log(alpha) per unit of relative entropy error
    alpha_integral_gain: float = 0.0  # integral: log(alpha) per unit of summed relative error
    alpha_max_change: float = 0.03  # the most log(alpha) moves in one update
    alpha_ema: float = 0.8  # smoothing of the entropy the controller reads
    alpha_update: Literal["step", "eval"] = "step"  # read each step's entropy, or each evaluation's
    # cDPO's eps (hdpo, f-DPO, sigmoid_norm), rDPO's flip rate (robust) or EXO's eps (exo_pair, where 0
    # reads as EXO_DEFAULT_EPSILON = 1e-3: eps = 0 makes that loss infinite)
    label_smoothing: float = 0.0
    f_alpha: float = 0.5
    nll_weight: float = 0.0
    tdpo_alpha: float = 0.5  # TDPO2's weight of the sequential-KL margin (the paper code's default)
    discopop_tau: float = DISCOPOP_DEFAULT_TAU  # DiscoPOP's mixing temperature (the paper's 0.05)
    dpop_lambda: float = DPOP_DEFAULT_LAMBDA  # DPOP's penalty on a fall of the chosen log-ratio below 0
    simpo_gamma: float = 0.5  # SimPO's target reward margin gamma, in reward units (TRL's default)
    # WPO: weigh each pair by the policy's probability of it (objectives/modifiers.py wpo_weights)
    weighting: Literal["none", "wpo"] = "none"
    # LD-DPO: the weight of the longer response's tokens past the shorter one's length (null: off)
    ld_alpha: float | None = None


@dataclass
class OptimConfig:
    lr: float = 5e-7
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 100
    pairs_per_step: int = 64
    seed: int = 42
    save_every: int = 0  # 0: only at the end
    resume: str = "auto"  # auto | never | PATH (a checkpoint folder or a checkpoints root)
    resume_force: bool = False  # resume even when the config changes the math (the keys are logged)
    keep_checkpoints: int = 3  # complete checkpoints kept (latest and protected ones never go)
    max_nonfinite_steps: int = 5  # consecutive skipped non-finite steps before stopping
    export_hf: bool = True  # write <output_dir>/hf (safetensors, tokenizer) at the end
    export_merged: bool = False  # LoRA: also the merged model (base + adapter) in <output_dir>/hf
    eval_every: int = 0  # 0: only at the end
    eval_pairs: int = 0  # 0: the whole eval set
    top_k: int = 10
    logits_chunk_size: int = 1024
    # auto | true | false: the policy's log-probs and monitors from hidden states in chunks, never the
    # full logits (runtime/fused_head.py; auto: from a vocabulary of FUSED_HEAD_MIN_VOCAB on)
    fused_head: Literal["auto", True, False] = "auto"
    # Diagnostics: write the full gathered gradient of these steps to output_dir/diagnostics/.
    dump_gradients_at: list[int] = field(default_factory=list)
    # How long a collective may wait for the slowest rank: rank-0-only work (hashing weight files,
    # tokenizing a large dataset, fsync of a 35B checkpoint) runs while the others wait in one.
    dist_timeout_minutes: float = 60.0
    # Ulysses sequence parallelism: groups of this many ranks share each micro-batch's tokens
    # (runtime/sequence_parallel.py); data.max_tokens_per_micro_batch stays per rank
    sequence_parallel: int = 1
    # One device's peak TFLOPS for perf/mfu; 0: the GPU table (runtime/perf.py) or, on a CPU or an
    # unknown GPU, a matrix product measured at start-up
    peak_tflops: float = 0.0


@dataclass
class MonitorsConfig:
    """Over-optimisation detectors on evaluation metrics (hdpo_ds/monitoring/detectors.py,
    docs/monitors.md)."""

    enabled: bool = True
    detectors: list[str] = field(default_factory=lambda: list(DETECTORS))
    on_alert: Literal["warn", "stop"] = "warn"  # stop: end cleanly after the evaluation that fired
    side: Literal["chosen", "rejected"] = "chosen"  # whose top-k entropy / mass the detectors read
    smoothing: Literal["ema", "window", "none"] = "ema"
    ema_decay: float = 0.5
    window: int = 3
    turn_drop: float = 0.1  # (a) bits below the peak of top-k entropy
    falling_evals: int = 3  # (b) consecutive evaluations with both log-probs falling
    topk_mass_floor: float = 0.0  # (c) 0: off
    topk_mass_max_drop_per_step: float = 0.002  # (c) 0: off
    accuracy_saturation: float = 0.98  # (d)
    saturated_evals: int = 3  # (d)
    best_metric: str = "eval/loss"  # which checkpoint checkpoints/best.json names
    best_mode: Literal["min", "max"] = "min"
    plots: bool = (
        True  # PNG plots of the monitors as MLflow artifacts at the end (hdpo_ds/tracking/report.py)
    )


@dataclass
class LoggingConfig:
    tracking_uri: str = ""
    experiment: str = "hdpo_ds"
    run_name: str = ""
    progress_bar: bool = True
    # Records go through a spool under output_dir and a background sender (docs/mlflow.md).
    flush_timeout_s: float = 60.0  # at the end, wait at most this long for unsent records
    retry_max_interval_s: float = 30.0  # back-off cap between retries while the server is unreachable
    http_max_retries: int = 2  # MLFLOW_HTTP_REQUEST_MAX_RETRIES when the environment does not set it
    http_timeout_s: int = 20  # MLFLOW_HTTP_REQUEST_TIMEOUT (seconds) likewise


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitors: MonitorsConfig = field(default_factory=MonitorsConfig)
    output_dir: str = "outputs/run"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check (and gently convert) `value` against a field annotation; errors name the key."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        for option in options:
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(map(_describe, options))}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        item_types = set(typing.get_args(item_type)) or {item_type}
        single_file = isinstance(value, str | int | float) and str in item_types
        if single_file or (isinstance(value, dict) and dict in item_types):
            value = [value]  # a single file (or source mapping) where a list is expected
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "3e-4" as a string; accept the number it plainly is.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _describe(annotation: Any) -> str:
    """What a value of this annotation looks like, for error messages."""
    if typing.get_origin(annotation) is Literal:
        return " or ".join(map(repr, typing.get_args(annotation)))
    if typing.get_origin(annotation) is list:
        return "a list"
    names = {
        float: "a number",
        int: "an integer",
        str: "a string",
        bool: "true or false",
        dict: "a mapping",
        type(None): "null",
    }
    return names.get(annotation, str(annotation))


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            valid = ", ".join(sorted(names))
            raise ConfigError(f"{key}: unknown key (valid keys here: {valid})")
        current = getattr(obj, name)
        if isinstance(value, _OverrideText):
            # a string key takes the override's text when YAML makes something else of it (`1:3` is the
            # base-60 number 63, `-1:` a mapping, `on` true); a quoted value is already a string
            wants_text = _takes_text(hints[name]) and not isinstance(value.parsed, str)
            value = value.text if wants_text else value.parsed
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
            _apply(current, value, prefix=f"{key}.")
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def _takes_text(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    return annotation is str


@dataclass
class _OverrideText:
    """A command-line value: its text, and what YAML makes of it (for keys that are not strings)."""

    text: str
    parsed: Any


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    dotted, raw = item.split("=", 1)
    value = _OverrideText(raw, yaml.safe_load(raw) if raw != "" else "")
    nested: dict = {}
    node = nested
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then `key.sub=value` overrides (values parsed as YAML); validated."""
    cfg = Config()
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"--config: no such file {path}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: expected a mapping at the top level")
        _apply(cfg, data)
    for item in overrides or []:
        _apply(cfg, _parse_override(item))
    validate(cfg)
    return cfg


def loss_terms(loss: LossConfig) -> tuple[str, ...]:
    """The loss type's terms as configured: one name, or the names of a weighted combination."""
    return tuple(loss.type) if isinstance(loss.type, list) else (loss.type,)


def loss_label(loss: LossConfig) -> str:
    """The loss as the progress bar and the logs name it: `hdpo`, or `0.8*hdpo + 0.2*bco_pair + 1*sft`."""
    if not isinstance(loss.type, list):
        return "H-DPO" if loss.type == "hdpo" else loss.type
    weights = loss.weights or [1.0] * len(loss.type)
    return " + ".join(f"{w:g}*{name}" for name, w in zip(loss.type, weights, strict=True))


def validate(cfg: Config) -> None:
    """Checks that need no files or engines; the trainer checks paths before it builds anything."""
    if isinstance(cfg.loss.type, list):
        names = _validate_combination(cfg)
    else:
        if cfg.loss.weights is not None:
            raise ConfigError(
                f"loss.weights: {cfg.loss.weights} weigh the terms of a list-valued loss.type; with the "
                f"single loss.type={cfg.loss.type} leave it null"
            )
        names = (_validate_single_type(cfg),)
    if not cfg.loss.beta > 0:
        raise ConfigError(f"loss.beta: must be > 0, got {cfg.loss.beta}")
    coef = cfg.model.router_aux_loss_coef
    if coef is not None and not (isinstance(coef, (int, float)) and 0 <= coef < float("inf")):
        raise ConfigError(f"model.router_aux_loss_coef: must be a number >= 0 or null, got {coef!r}")
    if "exo_pair" in names and cfg.loss.label_smoothing == 0.0:
        if len(names) > 1:  # the key is shared with the other terms: no silent rewrite
            raise ConfigError(
                "loss.label_smoothing: the exo_pair term needs EXO's eps > 0 (0 makes its loss infinite), "
                f"e.g. {EXO_DEFAULT_EPSILON}; in a combination it also reaches the other terms that read it"
            )
        # the key's general default 0 would make EXO's loss infinite: it reads as EXO's usual eps, and the
        # run's saved config and MLflow params show the value trained with
        cfg.loss.label_smoothing = EXO_DEFAULT_EPSILON
    if cfg.loss.alpha == "auto":
        _validate_adaptive_alpha(cfg)
    elif not cfg.loss.alpha > 0:
        raise ConfigError(f"loss.alpha: must be > 0, got {cfg.loss.alpha}")
    if cfg.loss.type in ("dpo", "sigmoid") and cfg.loss.alpha != 1.0:
        raise ConfigError(f"loss.alpha: loss.type={cfg.loss.type} means alpha=1; use loss.type=hdpo")
    _refuse_inert_loss_keys(cfg, names)
    _validate_modifiers(cfg, names)
    _validate_monitors(cfg)
    if not 0 < cfg.loss.f_alpha < 1:
        raise ConfigError(f"loss.f_alpha: must lie in (0, 1), got {cfg.loss.f_alpha}")
    if not 0 <= cfg.loss.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing: must lie in [0, 0.5), got {cfg.loss.label_smoothing}")
    if not cfg.loss.discopop_tau > 0:
        raise ConfigError(f"loss.discopop_tau: must be > 0, got {cfg.loss.discopop_tau}")
    if not (cfg.loss.dpop_lambda >= 0 and math.isfinite(cfg.loss.dpop_lambda)):
        raise ConfigError(f"loss.dpop_lambda: must be a finite number >= 0, got {cfg.loss.dpop_lambda}")
    if cfg.loss.nll_weight < 0:
        raise ConfigError(f"loss.nll_weight: must be >= 0, got {cfg.loss.nll_weight}")
    if not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path: required (a local model directory, hub id, or config)")
    if not cfg.data.train_files:
        raise ConfigError("data.train_files: required (one or more files or dataset directories)")
    try:
        parse_sources(cfg.data.train_files, "data.train_files")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, rows in (("data.rows", cfg.data.rows), ("data.eval_rows", cfg.data.eval_rows)):
        try:
            parse_rows(rows or None)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    if not cfg.train.dist_timeout_minutes > 0:
        raise ConfigError(f"train.dist_timeout_minutes: must be > 0, got {cfg.train.dist_timeout_minutes}")
    if not cfg.train.peak_tflops >= 0:
        raise ConfigError(
            f"train.peak_tflops: must be >= 0 (0: the GPU table or a measurement), got "
            f"{cfg.train.peak_tflops}"
        )
    _validate_lora(cfg)
    _validate_reference_sync(cfg)
    if cfg.reference.mode == "cached" and not cfg.reference.cache_path:
        raise ConfigError("reference.cache_path: required with reference.mode=cached (the precomputed cache)")
    positive = {
        "train.max_steps": cfg.train.max_steps,
        "train.pairs_per_step": cfg.train.pairs_per_step,
        "data.max_length": cfg.data.max_length,
        "data.max_prompt_length": cfg.data.max_prompt_length,
        "data.max_tokens_per_micro_batch": cfg.data.max_tokens_per_micro_batch,
        "train.top_k": cfg.train.top_k,
        "train.logits_chunk_size": cfg.train.logits_chunk_size,
        "reference.shard_pairs": cfg.reference.shard_pairs,
        "train.max_nonfinite_steps": cfg.train.max_nonfinite_steps,
        "train.sequence_parallel": cfg.train.sequence_parallel,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(
            f"data.max_prompt_length: must be < data.max_length ({cfg.data.max_length}), "
            f"got {cfg.data.max_prompt_length}"
        )
    sp = cfg.train.sequence_parallel
    if not isinstance(sp, int) or isinstance(sp, bool):
        raise ConfigError(f"train.sequence_parallel: must be an integer >= 1, got {sp!r}")
    if sp > 1 and not cfg.data.packing:
        raise ConfigError(
            f"train.sequence_parallel: {sp} splits packed rows; set data.packing=true (padded rows are not "
            "split)"
        )
    if cfg.data.max_tokens_per_micro_batch * sp < 2 * cfg.data.max_length:
        per_group = "" if sp == 1 else f" x train.sequence_parallel ({sp}), the group's budget,"
        raise ConfigError(
            f"data.max_tokens_per_micro_batch{per_group}: must be >= 2 * data.max_length = "
            f"{2 * cfg.data.max_length} so a pair fits in one micro-batch, got "
            f"{cfg.data.max_tokens_per_micro_batch}"
        )
    for key, value in {
        "train.save_every": cfg.train.save_every,
        "train.eval_every": cfg.train.eval_every,
        "train.eval_pairs": cfg.train.eval_pairs,
        "optim.warmup_steps": cfg.optim.warmup_steps,
    }.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if not cfg.optim.lr >= 0:
        raise ConfigError(f"optim.lr: must be >= 0, got {cfg.optim.lr}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: must lie in [0, 1], got {cfg.optim.min_lr_ratio}")
    if cfg.optim.max_grad_norm < 0:
        raise ConfigError(
            f"optim.max_grad_norm: must be >= 0 (0 disables clipping), got {cfg.optim.max_grad_norm}"
        )
    if not cfg.logging.flush_timeout_s >= 0:
        raise ConfigError(f"logging.flush_timeout_s: must be >= 0, got {cfg.logging.flush_timeout_s}")
    if not cfg.logging.retry_max_interval_s > 0:
        raise ConfigError(
            f"logging.retry_max_interval_s: must be > 0, got {cfg.logging.retry_max_interval_s}"
        )
    if not 0 <= cfg.logging.http_max_retries <= 10:  # MLflow refuses more than 10
        raise ConfigError(
            f"logging.http_max_retries: must lie in [0, 10], got {cfg.logging.http_max_retries}"
        )
    if cfg.logging.http_timeout_s < 1:
        raise ConfigError(f"logging.http_timeout_s: must be >= 1, got {cfg.logging.http_timeout_s}")
    if cfg.optim.warmup_steps > cfg.train.max_steps:
        raise ConfigError(
            f"optim.warmup_steps: {cfg.optim.warmup_steps} exceeds train.max_steps={cfg.train.max_steps}"
        )


def _validate_single_type(cfg: Config) -> str:
    """The canonical name of a single loss.type (TDPO and reference-free types checked here too)."""
    if cfg.loss.type in REFERENCE_FREE_LOSS_TYPES:
        _validate_reference_free(cfg)
        return cfg.loss.type
    if cfg.loss.type in TDPO_LOSS_TYPES:
        _validate_tdpo(cfg)
        return cfg.loss.type
    if cfg.loss.type in COUPLED_LOSS_TYPES:  # coupled across the step; keys checked as for the others
        return cfg.loss.type
    try:
        return canonical_loss_type(cfg.loss.type)
    except ValueError as e:
        raise ConfigError(
            f"loss.type: {e} (or the token-level {', '.join(TDPO_LOSS_TYPES)}, the reference-free "
            f"{', '.join(REFERENCE_FREE_LOSS_TYPES)}, or the step-coupled "
            f"{', '.join(COUPLED_LOSS_TYPES)})"
        ) from None


def _validate_combination(cfg: Config) -> tuple[str, ...]:
    """A list-valued loss.type: a weighted sum of sequence-level terms, at most one step-coupled term,
    and `sft`. The canonical names of its terms (sft kept as such)."""
    loss = cfg.loss
    types = loss.type
    if len(types) < 2:
        raise ConfigError(f"loss.type: a list names two or more terms, got {types}; write a single type")
    if len(set(types)) != len(types):
        raise ConfigError(f"loss.type: {types} names a term twice; give it a larger loss.weights entry")
    names = []
    for i, term in enumerate(types):
        if term == SFT_TERM or term in COUPLED_LOSS_TYPES:
            names.append(term)
        elif term in TDPO_LOSS_TYPES or term in REFERENCE_FREE_LOSS_TYPES:
            kind = (
                "token-level (its KL needs the reference logits)"
                if term in TDPO_LOSS_TYPES
                else ("reference-free (the other terms read a reference, which it would not)")
            )
            raise ConfigError(
                f"loss.type[{i}]: {term} is {kind}; it is not combined with other terms, use it alone"
            )
        else:
            try:
                names.append(canonical_loss_type(term))
            except ValueError:
                valid = ", ".join([*LOSS_TYPES, "dpo", "sigmoid", *COUPLED_LOSS_TYPES, SFT_TERM])
                raise ConfigError(f"loss.type[{i}]: unknown term {term!r}; valid terms: {valid}") from None
    if len(set(names)) != len(names):
        raise ConfigError(f"loss.type: {types} names the same loss twice (an alias of another term)")
    coupled = [n for n in names if n in COUPLED_LOSS_TYPES]
    if len(coupled) > 1:
        raise ConfigError(
            f"loss.type: {coupled} each couple the step's pairs (a reward baseline, a sorted pairing); a "
            "combination takes at most one of them"
        )
    if SFT_TERM in names and loss.nll_weight != 0.0:
        raise ConfigError(
            f"loss.nll_weight: {loss.nll_weight} adds the chosen-response NLL that the sft term of "
            f"loss.type={types} already is; set one of them (the sft term's weight in loss.weights)"
        )
    if loss.weights is not None:
        if len(loss.weights) != len(types):
            raise ConfigError(
                f"loss.weights: {len(loss.weights)} weights for the {len(types)} terms of loss.type={types}"
            )
        # A weight of 0 keeps a term logged (loss/<name>) but out of the gradient: an ablation control.
        for i, w in enumerate(loss.weights):
            if not (w >= 0 and math.isfinite(w)):
                raise ConfigError(f"loss.weights[{i}]: must be a finite number >= 0, got {w}")
        if not any(w > 0 for w in loss.weights):
            raise ConfigError(f"loss.weights: {loss.weights} trains nothing; at least one weight must be > 0")
    return tuple(names)


def _validate_modifiers(cfg: Config, names: tuple[str, ...]) -> None:
    """loss.weighting (WPO) applies to every type; loss.ld_alpha (LD-DPO) to the losses that compare
    sequence log-probs with a reference computed online (the cache holds plain sums)."""
    loss = cfg.loss
    if loss.ld_alpha is None:
        return
    if not 0 <= loss.ld_alpha <= 1:
        raise ConfigError(f"loss.ld_alpha: must lie in [0, 1] (1 is plain DPO), got {loss.ld_alpha}")
    for name in names:
        if name in TDPO_LOSS_TYPES or name in REFERENCE_FREE_LOSS_TYPES:
            raise ConfigError(
                f"loss.ld_alpha: LD-DPO desensitises the policy's and the reference's sequence log-probs; "
                f"loss.type={name} has "
                + ("a token-level KL term" if name in TDPO_LOSS_TYPES else "no reference")
                + " (leave loss.ld_alpha null)"
            )
    if cfg.reference.mode != "online":
        raise ConfigError(
            f"reference.mode: loss.ld_alpha needs the reference's per-token log-probs (each pair's "
            f"shorter length decides their weights), which the cache (one sum per sequence) does not "
            f"hold; use reference.mode=online, got {cfg.reference.mode}"
        )


def _refuse_inert_loss_keys(cfg: Config, names: tuple[str, ...]) -> None:
    """A loss key the chosen loss type never reads must stay at its default, or the run would silently
    train something other than what the config says (e.g. loss.type=ipo with loss.alpha=0.5). For alpha
    the message says why it has no meaning there (objectives/losses.py `alpha_does_not_apply`)."""
    defaults = LossConfig()
    used = {
        # as written: an alias (dpo, sigmoid) means alpha 1, in a combination too
        "alpha": any(n in ALPHA_LOSS_TYPES for n in loss_terms(cfg.loss)),
        "label_smoothing": any(n in LABEL_SMOOTHING_LOSS_TYPES for n in names),
        "f_alpha": "fdpo_alpha" in names,
        "tdpo_alpha": "tdpo2" in names,
        "discopop_tau": "discopop" in names,
        "dpop_lambda": "dpop" in names,
        "simpo_gamma": "simpo" in names,
    }
    for key, applies in used.items():
        value = getattr(cfg.loss, key)
        if not applies and value != getattr(defaults, key):
            why = ""
            if key == "alpha":
                terms = [n for n in names if n != SFT_TERM]
                why = (
                    f": {alpha_does_not_apply(terms[0])}"
                    if len(terms) == 1
                    else (f": no term of the combination is one of {', '.join(sorted(ALPHA_LOSS_TYPES))}")
                )
            raise ConfigError(
                f"loss.{key}: {value} has no effect with loss.type={cfg.loss.type}{why}; "
                f"leave it at {getattr(defaults, key)}"
            )


def _validate_adaptive_alpha(cfg: Config) -> None:
    loss = cfg.loss
    # the types as written (an alias such as dpo means alpha 1): one, or a combination's alpha term
    if not any(n in ALPHA_LOSS_TYPES for n in loss_terms(loss)):
        raise ConfigError(
            f"loss.alpha: auto steers H-DPO's alpha; it needs a loss.type where alpha applies "
            f"({', '.join(sorted(ALPHA_LOSS_TYPES))}), got {cfg.loss.type}"
        )
    if not loss.target_entropy > 0:
        raise ConfigError(
            f"loss.target_entropy: loss.alpha=auto needs a target > 0 (nats per chosen-response token), "
            f"got {loss.target_entropy}"
        )
    if not 0 < loss.alpha_min <= loss.alpha_init <= loss.alpha_max:
        raise ConfigError(
            f"loss.alpha_init: needs 0 < loss.alpha_min <= loss.alpha_init <= loss.alpha_max, got "
            f"{loss.alpha_min} / {loss.alpha_init} / {loss.alpha_max}"
        )
    for key, value in (
        ("loss.alpha_gain", loss.alpha_gain),
        ("loss.alpha_max_change", loss.alpha_max_change),
    ):
        if not value > 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if loss.alpha_integral_gain < 0:
        raise ConfigError(f"loss.alpha_integral_gain: must be >= 0, got {loss.alpha_integral_gain}")
    if not 0 <= loss.alpha_ema < 1:
        raise ConfigError(f"loss.alpha_ema: must lie in [0, 1), got {loss.alpha_ema}")
    if loss.alpha_update == "eval" and not (cfg.data.eval_files and cfg.train.eval_every):
        raise ConfigError("loss.alpha_update: eval needs data.eval_files and train.eval_every > 0")


def _validate_monitors(cfg: Config) -> None:
    m = cfg.monitors
    for i, name in enumerate(m.detectors):
        if name not in DETECTORS:
            raise ConfigError(
                f"monitors.detectors[{i}]: unknown detector {name!r} (valid: {', '.join(DETECTORS)})"
            )
    if not 0 <= m.ema_decay < 1:
        raise ConfigError(f"monitors.ema_decay: must lie in [0, 1), got {m.ema_decay}")
    for key, value in (
        ("monitors.window", m.window),
        ("monitors.falling_evals", m.falling_evals),
        ("monitors.saturated_evals", m.saturated_evals),
    ):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    for key, value in (
        ("monitors.turn_drop", m.turn_drop),
        ("monitors.topk_mass_floor", m.topk_mass_floor),
        ("monitors.topk_mass_max_drop_per_step", m.topk_mass_max_drop_per_step),
    ):
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if not 0 < m.accuracy_saturation <= 1:
        raise ConfigError(f"monitors.accuracy_saturation: must lie in (0, 1], got {m.accuracy_saturation}")
    if not m.best_metric.startswith("eval/"):
        raise ConfigError(f"monitors.best_metric: an evaluation metric (eval/...), got {m.best_metric!r}")


def lora_enabled(cfg: Config) -> bool:
    """LoRA is on when model.lora.r > 0."""
    return cfg.model.lora.r > 0


def reference_source(cfg: Config) -> str:
    """reference.source resolved: `adapters_off` (the policy's engine with its adapters disabled) or
    `engine` (a reference engine of its own); auto is adapters_off under LoRA, else engine."""
    if cfg.reference.source != "auto":
        return cfg.reference.source
    return "adapters_off" if lora_enabled(cfg) else "engine"


# A LoRA target or modules_to_save entry naming the output layer: the fused head (runtime/fused_head.py)
# reads only lm_head.weight and lm_head.bias, never an adapter's or a saved copy's.
_OUTPUT_LAYER = "lm_head"


def lora_adapts_output_layer(lora: LoraConfig) -> bool:
    """Whether model.lora names the output layer (peft matches a name or a dotted suffix; all-linear
    leaves the output layer out)."""
    targets = [] if lora.target_modules == "all-linear" else lora.target_modules
    return any(name.split(".")[-1] == _OUTPUT_LAYER for name in [*targets, *lora.modules_to_save])


def _validate_lora(cfg: Config) -> None:
    """model.lora and what depends on it: a key that would have no effect, or a combination LoRA cannot
    serve yet, is refused by name."""
    lora, defaults, ref = cfg.model.lora, LoraConfig(), cfg.reference
    if lora.r < 0:
        raise ConfigError(f"model.lora.r: must be >= 0 (0: no LoRA), got {lora.r}")
    if not lora_enabled(cfg):
        for key in ("alpha", "dropout", "target_modules", "modules_to_save", "init_adapter"):
            if getattr(lora, key) != getattr(defaults, key):
                raise ConfigError(
                    f"model.lora.{key}: {getattr(lora, key)!r} has no effect with model.lora.r=0 (LoRA is "
                    f"off); set model.lora.r > 0, or leave it at {getattr(defaults, key)!r}"
                )
        if ref.source == "adapters_off":
            raise ConfigError(
                "reference.source: adapters_off needs LoRA adapters to switch off (model.lora.r > 0); "
                "use reference.source=engine or auto"
            )
        if cfg.train.export_merged:
            raise ConfigError(
                "train.export_merged: merges LoRA adapters into the base (model.lora.r > 0); without LoRA "
                "<output_dir>/hf is the whole model already"
            )
        return
    if cfg.train.export_merged and not cfg.train.export_hf:
        raise ConfigError("train.export_merged: true needs train.export_hf: true (it writes <output_dir>/hf)")
    if not (lora.alpha > 0 and math.isfinite(lora.alpha)):
        raise ConfigError(f"model.lora.alpha: must be a finite number > 0, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout: must lie in [0, 1), got {lora.dropout}")
    if lora.target_modules != "all-linear" and not lora.target_modules:
        raise ConfigError("model.lora.target_modules: name one module or more, or write all-linear")
    for key in ("target_modules", "modules_to_save"):
        names = getattr(lora, key)
        for i, name in enumerate([] if names == "all-linear" else names):
            if not name.strip():
                raise ConfigError(f"model.lora.{key}[{i}]: an empty module name")
    if ref.sync != "none":
        raise ConfigError(
            f"reference.sync: {ref.sync} (TR-DPO) is not available with LoRA (model.lora.r={lora.r}): the "
            "reference is the frozen base model, which does not move; use reference.sync=none"
        )
    if reference_source(cfg) == "adapters_off" and ref.name_or_path:
        raise ConfigError(
            f"reference.name_or_path: {ref.name_or_path!r} has no effect with reference.source=adapters_off "
            "(the reference is the policy's base model with its adapters disabled); leave it empty, or set "
            "reference.source=engine"
        )
    if reference_source(cfg) == "adapters_off" and ref.mode == "online" and ref.offload:
        raise ConfigError(
            "reference.offload: true has no effect with reference.source=adapters_off (no reference engine "
            "is built); leave it false, or set reference.source=engine"
        )
    if ref.source != "auto" and ref.mode != "online":
        raise ConfigError(
            f"reference.source: {ref.source} says what computes the reference online; with "
            f"reference.mode={ref.mode} the values come from the cache (the precompute pass runs the base "
            "model in its own engine); leave it at auto"
        )
    if cfg.train.fused_head is True and lora_adapts_output_layer(lora):
        raise ConfigError(
            "train.fused_head: true reads only lm_head.weight and lm_head.bias, but model.lora adapts the "
            "output layer (model.lora.target_modules or model.lora.modules_to_save names lm_head); set "
            "train.fused_head=false or auto, or leave lm_head out"
        )


def _validate_reference_sync(cfg: Config) -> None:
    """reference.sync moves the online reference engine; a key that would have no effect is refused.
    (The reference-free losses refuse any non-default reference.* key earlier, sync included.)"""
    ref, defaults = cfg.reference, ReferenceConfig()
    if ref.sync == "none":
        for key in ("sync_alpha", "sync_every"):
            if getattr(ref, key) != getattr(defaults, key):
                raise ConfigError(
                    f"reference.{key}: {getattr(ref, key)} has no effect with reference.sync=none (the "
                    f"reference never moves); set reference.sync=soft or hard, or leave it at "
                    f"{getattr(defaults, key)}"
                )
        return
    if ref.mode != "online":
        raise ConfigError(
            f"reference.sync: {ref.sync} moves the reference during training, but reference.mode={ref.mode} "
            "reads cached values of the initial reference; use reference.mode=online"
        )
    if ref.sync == "hard" and ref.sync_alpha != defaults.sync_alpha:
        raise ConfigError(
            f"reference.sync_alpha: {ref.sync_alpha} has no effect with reference.sync=hard (the reference "
            f"becomes a copy of the policy); use reference.sync=soft, or leave it at {defaults.sync_alpha}"
        )
    if not 0 < ref.sync_alpha <= 1:
        raise ConfigError(f"reference.sync_alpha: must lie in (0, 1], got {ref.sync_alpha}")
    if ref.sync_every < 1:
        raise ConfigError(f"reference.sync_every: must be >= 1 optimizer update, got {ref.sync_every}")


def _validate_tdpo(cfg: Config) -> None:
    if cfg.reference.mode != "online":
        raise ConfigError(
            f"reference.mode: loss.type={cfg.loss.type} needs the reference's full next-token distribution "
            f"at every response position, which the cache (one log-prob per sequence) does not hold; use "
            f"reference.mode=online"
        )
    if not cfg.loss.tdpo_alpha > 0:
        raise ConfigError(f"loss.tdpo_alpha: must be > 0, got {cfg.loss.tdpo_alpha}")
    for key, value, default in (
        ("loss.alpha", cfg.loss.alpha, 1.0),
        ("loss.label_smoothing", cfg.loss.label_smoothing, 0.0),
        ("loss.nll_weight", cfg.loss.nll_weight, 0.0),
    ):
        if value != default:
            raise ConfigError(f"{key}: does not apply to loss.type={cfg.loss.type}; leave it at {default}")


def _validate_reference_free(cfg: Config) -> None:
    """SimPO, CPO, ORPO read no reference: every reference.* key keeps its default (the run builds no
    reference, so a changed one would be silently ignored), and so do the loss keys they never read."""
    loss = cfg.loss
    if loss.alpha != 1.0:
        raise ConfigError(
            f"loss.alpha: {loss.alpha} has no effect with the reference-free loss.type={loss.type}: H-DPO's "
            f"alpha weighs the policy against the reference, and without one it would only rescale "
            f"loss.beta; leave it at 1.0 (and tune loss.beta)"
        )
    if not loss.simpo_gamma >= 0:
        raise ConfigError(f"loss.simpo_gamma: must be >= 0, got {loss.simpo_gamma}")
    for key, value, default in (
        ("loss.label_smoothing", loss.label_smoothing, 0.0),
        ("loss.nll_weight", loss.nll_weight, 0.0),
    ):
        if value != default:
            raise ConfigError(
                f"{key}: does not apply to the reference-free loss.type={loss.type} (CPO and ORPO carry "
                f"their own NLL term); leave it at {default}"
            )
    defaults = dataclasses.asdict(ReferenceConfig())
    for name, value in dataclasses.asdict(cfg.reference).items():
        if value != defaults[name]:
            raise ConfigError(
                f"reference.{name}: {value!r} has no effect with the reference-free loss.type={loss.type} "
                f"(the run builds no reference: no engine, no cache); leave it at {defaults[name]!r}"
            )


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys used for overrides and MLflow params."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, prefix=f"{dotted}."))
        else:
            out[dotted] = value
    return out
