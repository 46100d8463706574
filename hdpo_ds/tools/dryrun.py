"""The dry run: everything a training job checks before it builds an engine, for a stated world size.

    python launch/train.py --dry-run --world-size 16 --ds ds_configs/zero3_35b.json \
        --config configs/command-r-35b.yaml [key.sub=value ...]

No launcher, process group or GPU is needed. It goes through the real code paths of a run, in the
order the trainer takes them: the run config (already validated by load_config), the DeepSpeed
configs filled for the world size (engine.fill_ds_config), the model config instantiated on the meta
device (exact parameter count), the data files (splits.load_split_records: every file's rows counted,
DRY_RUN_SAMPLE rows per split parsed, validated and tokenized, the pair count and lengths estimated
from them), the batch arithmetic of the sampler and packer for step 0 (data.PairSampler), the reference
cache's fingerprint (reference.reference_fingerprint, refcache.cache_status / RefCache.load), and finally the
memory plan (hdpo_ds.tools.plan) for the target GPUs. The first problem raises the error a real run would
raise, naming the config key; a plan that does not fit is an error too.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from hdpo_ds.config import Config, ConfigError, lora_enabled, loss_label, reference_source
from hdpo_ds.data import PairSampler, packing_stats, tokenize_pairs, tokenizer_fingerprint
from hdpo_ds.objectives.objective import make_objective
from hdpo_ds.objectives.reference_free import REFERENCE_FREE_LOSS_TYPES
from hdpo_ds.recipes.precompute import cache_root
from hdpo_ds.recipes.splits import load_split_records, tokenize_options
from hdpo_ds.reference.cache import RefCache, RefCacheError, cache_status
from hdpo_ds.reference.sources import model_identity, reference_fingerprint
from hdpo_ds.runtime import engine, sequence_parallel
from hdpo_ds.runtime.attention import attention_features, check_attention, choose_attention, select_attention
from hdpo_ds.runtime.fused_head import use_fused_head
from hdpo_ds.runtime.models import check_model_source, load_tokenizer
from hdpo_ds.tools.plan import (
    Hardware,
    MemoryPlan,
    format_plan,
    load_hf_config,
    lora_shape,
    micro_batch_flops,
    model_shape,
    plan_memory,
    recommend,
    settings_from_ds_config,
)

logger = logging.getLogger(__name__)

__all__ = ["DryRunReport", "dry_run", "format_report"]

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
# Rows per split the dry run validates and tokenizes (evenly spaced, per files-list entry by its size);
# every file's rows are still counted. A split this small or smaller is checked in full.
DRY_RUN_SAMPLE = 2000


@dataclass
class DryRunReport:
    world_size: int
    checks: list[str] = field(default_factory=list)  # one line per check that passed
    plan: MemoryPlan | None = None
    recommendation: dict | None = None
    step_seconds: float = 0.0


def _load_ds(path: str, key: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: no such DeepSpeed config {path}")
    return engine.load_ds_config(path)


def _check_weights(cfg: Config) -> str:
    """A run that loads weights (not from_scratch) needs them where model.name_or_path points."""
    path = cfg.model.name_or_path
    if cfg.model.from_scratch:
        return "model.from_scratch: random initialisation from the config, no weights needed"
    if not os.path.exists(path):
        return f"model.name_or_path: {path} found in the local Hugging Face cache"
    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    files = [f for pattern in _WEIGHT_PATTERNS for f in glob.glob(os.path.join(directory, pattern))]
    if not files:
        raise ConfigError(
            f"model.name_or_path: {path} holds a model config but no weight files (*.safetensors, *.bin); "
            "point it at the checkpoint directory, or set model.from_scratch=true for a random "
            "initialisation"
        )
    size = sum(os.path.getsize(f) for f in files)
    return f"model.name_or_path: {len(files)} weight file(s), {size / 2**30:.1f} GiB"


def _check_attention(cfg: Config, hf_config, source: str, device_type: str, dtype=None) -> str:
    """model.attn_implementation against what the model's attention needs (runtime.attention.check_attention).
    An explicit flash_attention_2 is checked for what it applies, not for flash-attn on this machine."""
    features = attention_features(hf_config, packing=cfg.data.packing)
    attn = cfg.model.attn_implementation
    reason = ""
    if attn == "auto":
        choice = choose_attention(
            attn, device_type, hf_config, packing=cfg.data.packing, source=source, dtype=dtype
        )
        attn, reason = choice.name, f"; {choice.reason}"
    else:
        check_attention(attn, features, source, device_type)
    return (
        f"model.attn_implementation: {attn} for {source} "
        f"(applies {', '.join(features) or 'causal attention'}{reason})"
    )


def _check_sequence_parallel(cfg: Config, hf_config, device_type: str, world_size: int, dtype=None) -> str:
    """train.sequence_parallel against the loss, the models, the attention core and the world size."""
    sp = cfg.train.sequence_parallel
    objective = make_objective(cfg.loss, chunk_size=cfg.train.logits_chunk_size)
    sequence_parallel.check_run(
        cfg, token_kl=objective.has_kl, reference=objective.needs_reference, loss=loss_label(cfg.loss)
    )
    attn = select_attention(
        cfg.model.attn_implementation, device_type, hf_config, packing=cfg.data.packing, dtype=dtype
    )
    sequence_parallel.check_layout(sp, attn, world_size)
    return (
        f"train.sequence_parallel: {world_size // sp} group(s) of {sp} ranks, each sharing rows of up to "
        f"{sp * cfg.data.max_tokens_per_micro_batch:,} tokens (Ulysses over {attn})"
    )


def dry_run(
    cfg: Config,
    ds_config_path: str,
    *,
    world_size: int,
    gpus_per_node: int | None = None,
    gpu_mem_gib: float = 79.0,
    peak_tflops: float = Hardware.peak_tflops,
    device_type: str = "cuda",
) -> DryRunReport:
    """Check a run for `world_size` ranks; raise the run's own error (key named) at the first problem."""
    if world_size < 1:
        raise ConfigError(f"--world-size: must be >= 1, got {world_size}")
    gpus_per_node = gpus_per_node or min(world_size, 8)
    if world_size % gpus_per_node:
        raise ConfigError(f"--world-size: {world_size} is not a multiple of --gpus-per-node {gpus_per_node}")
    report = DryRunReport(world_size)
    ok = report.checks.append

    # ---- configs: the run config was validated by load_config; the ds_configs are filled for this world size
    ds_config = _load_ds(ds_config_path, "--ds")
    # A reference-free loss builds no reference: its config (validated at its default) is not read.
    reference_free = cfg.loss.type in REFERENCE_FREE_LOSS_TYPES
    infer_ds_config = None if reference_free else _load_ds(cfg.reference.ds_config, "reference.ds_config")
    check_model_source(cfg.model)
    hf_config = load_hf_config(
        cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code, key="model.name_or_path"
    )
    shape = model_shape(hf_config, trust_remote_code=cfg.model.trust_remote_code, key="model.name_or_path")
    experts = (
        f", a mixture of {shape.num_experts} experts (top-{shape.experts_per_token}): "
        f"{shape.active_params:,} active per token"
        if shape.num_experts
        else ""
    )
    if cfg.model.moe_leaf_modules and not shape.num_experts:
        raise ConfigError(
            f"model.moe_leaf_modules: true, but {cfg.model.name_or_path} is not a mixture-of-experts model; "
            "set it false"
        )
    ok(f"model.name_or_path: {shape.model_type}, {shape.num_params:,} parameters (meta device){experts}")
    lora = None
    if lora_enabled(cfg):  # peft's wrap on the meta device, counted exactly (the planner's LoraShape)
        spec = cfg.model.lora
        lora = lora_shape(
            hf_config,
            spec.r,
            spec.target_modules,
            list(spec.modules_to_save),
            spec.dropout,
            trust_remote_code=cfg.model.trust_remote_code,
            key="model.lora.target_modules",
        )
        ok(
            f"model.lora: r={spec.r} on {lora.adapted_layers} layers, {lora.trainable_params:,} trainable "
            f"parameters ({100 * lora.trainable_params / shape.num_params:.3f}%), the frozen base without "
            "optimizer state"
        )
    ok(_check_weights(cfg))
    dtype = engine.resolve_dtype(cfg, ds_config, bf16_capable=device_type == "cuda")
    ok(_check_attention(cfg, hf_config, cfg.model.name_or_path, device_type, dtype))
    sp = cfg.train.sequence_parallel
    if sp > 1:
        ok(_check_sequence_parallel(cfg, hf_config, device_type, world_size, dtype))
    if cfg.reference.name_or_path:
        check_model_source(
            dataclasses.replace(cfg.model, name_or_path=cfg.reference.name_or_path),
            key="reference.name_or_path",
        )
        ok(f"reference.name_or_path: {cfg.reference.name_or_path}")
        ref_config = load_hf_config(
            cfg.reference.name_or_path,
            trust_remote_code=cfg.model.trust_remote_code,
            key="reference.name_or_path",
        )
        ok(_check_attention(cfg, ref_config, cfg.reference.name_or_path, device_type, dtype))
    policy_ds = engine.fill_ds_config(
        ds_config, cfg, world_size=world_size, device_type=device_type, hidden_size=shape.hidden_size
    )
    if not reference_free:
        engine.fill_ds_config(
            infer_ds_config,
            cfg,
            world_size=world_size,
            device_type=device_type,
            hidden_size=shape.hidden_size,
            training=False,
            dtype=dtype,
        )
    ok(
        f"ds_configs filled for {world_size} ranks ({str(dtype).removeprefix('torch.')}, ZeRO stage "
        f"{policy_ds.get('zero_optimization', {}).get('stage', 0)})"
    )

    # ---- data: every file's rows counted; a sample of rows parsed, validated and tokenized (in memory; the
    # run's cache is left alone), the lengths and the pair count estimated from it
    tokenizer = load_tokenizer(cfg.model)
    records = load_split_records(cfg, sample=DRY_RUN_SAMPLE)
    options = {**tokenize_options(cfg), "cache_dir": None}
    tokenized = {name: tokenize_pairs(recs, tokenizer, **options) for name, recs in records.items()}
    estimated = {}
    for name, result in tokenized.items():
        loaded = records[name]
        skipped = sum(loaded.skipped.values())
        if loaded.sampled_rows is None:
            estimated[name] = len(result.pairs)
            pairs = len(result.pairs)
            ok(f"data ({name}): {len(loaded.records):,} records -> {pairs:,} pairs ({skipped} skipped)")
            continue
        # the sample's kept fraction (validation and tokenization) times the rows selected
        estimated[name] = round(loaded.num_rows * len(result.pairs) / loaded.sampled_rows)
        longest = result.pairs.lengths.max(axis=1) if len(result.pairs) else np.zeros(1, dtype=np.int64)
        spread = (
            f"median {int(np.median(longest))}, p95 {int(np.percentile(longest, 95))}, max {longest.max()}"
        )
        ok(
            f"data ({name}): {loaded.num_rows:,} rows read; {loaded.sampled_rows:,} of them (evenly spaced) "
            f"validated and tokenized: {len(result.pairs):,} pairs ({skipped} skipped) -> about "
            f"{estimated[name]:,} pairs in all; longer sequence per pair in the sample: {spread} tokens"
        )

    # ---- batch arithmetic: the sampler and packer of step 0 as rank 0 of the run builds them (over the
    # sample's pairs when the data was sampled: step 0's packing is then an estimate)
    train = tokenized["train"].pairs
    lengths, sources = train.lengths, train.sources
    weights = records["train"].entries.weights
    pairs_per_step = cfg.train.pairs_per_step
    if records["train"].sampled_rows is not None:
        if estimated["train"] < pairs_per_step:
            raise ConfigError(
                f"train.pairs_per_step ({pairs_per_step}) exceeds the number of pairs (about "
                f"{estimated['train']}): with drop_last an epoch would have no step"
            )
        if 0 < len(lengths) < pairs_per_step:  # a step needs pairs_per_step pairs: repeat the sample's
            lengths, sources = np.resize(lengths, (pairs_per_step, 2)), np.resize(sources, pairs_per_step)
    try:
        sampler = PairSampler(
            lengths,
            pairs_per_step=pairs_per_step,
            world_size=world_size // sp,  # a sequence-parallel group shares its micro-batches
            rank=0,
            seed=cfg.train.seed,
            max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch * sp,
            max_length=cfg.data.max_length,
            packing=cfg.data.packing,
            sources=sources if weights is not None else None,
            weights=weights,
            multiple_of=sp,
        )
    except ValueError as e:
        message = str(e)
        raise ConfigError(
            message if message.startswith(("train.", "data.")) else f"train.pairs_per_step: {e}"
        ) from None
    packed = sampler.assignment(0, 0).packed
    stats = packing_stats(packed)
    per_rank = [sum(len(mb.pairs) for mb in mbs if not mb.filler) for mbs in packed.ranks]
    fillers = sum(mb.filler for mbs in packed.ranks for mb in mbs)
    steps_per_epoch = estimated["train"] // pairs_per_step  # = len(sampler) without a sample
    epochs = cfg.train.max_steps / steps_per_epoch
    ok(
        f"batch: {cfg.train.pairs_per_step} pairs per step over {world_size} ranks; step 0: "
        f"{packed.micro_batches_per_rank} micro-batch(es) per rank, {min(per_rank)}-{max(per_rank)} pairs "
        f"per rank, {fillers} filler(s), fill {stats.fill:.0%}; {steps_per_epoch} steps per epoch, "
        f"train.max_steps={cfg.train.max_steps} = {epochs:.2f} epoch(s)"
    )

    # ---- the reference cache: its fingerprint against this run's (what precompute would write)
    if reference_free:
        ok(f"reference: none (loss.type={cfg.loss.type} is reference-free: no engine, no cache)")
    elif cfg.reference.mode in ("cached", "auto"):
        root = cache_root(cfg)
        template = cfg.data.chat_template or None
        identity = model_identity(cfg)  # the weight files, hashed once for every split
        for name in records:
            where = os.path.join(root, name)
            expected = reference_fingerprint(
                cfg,
                data_fingerprint=records[name].fingerprint,
                tokenizer_fingerprint=tokenizer_fingerprint(tokenizer, template),
                dtype=dtype,
                identity=identity,
            )
            status, differences = cache_status(where, expected)
            if status == "stale" and not (cfg.reference.mode == "auto" and cfg.reference.rebuild_stale):
                raise RefCacheError(
                    f"reference.cache_path: the reference cache at {where} is stale (recompute it with "
                    "launch/precompute_ref.py, or set reference.mode=auto reference.rebuild_stale=true):\n  "
                    + "\n  ".join(differences)
                )
            if status == "missing" and cfg.reference.mode == "cached":
                raise RefCacheError(
                    f"reference.cache_path: no reference cache at {where}; run "
                    "launch/precompute_ref.py first, or use reference.mode=auto"
                )
            if status == "ok" and records[name].sampled_rows is not None:
                cache, ids = RefCache.load(where, expected), tokenized[name].pairs.ids
                missing = [ids[i] for i in np.flatnonzero(cache.rows_of(ids) < 0)]
                if missing:
                    raise RefCacheError(
                        f"reference.cache_path: the reference cache at {where} has no values for "
                        f"{len(missing)} of the {len(ids)} sampled pair(s), e.g. ids {missing[:5]}"
                    )
                ok(f"reference cache ({name}): {where} matches this run and covers the sampled pairs")
            elif status == "ok":
                RefCache.load(where, expected).check_covers(tokenized[name].pairs.ids)
                ok(f"reference cache ({name}): {where} matches this run and covers every pair")
            else:
                ok(f"reference cache ({name}): {status} at {where}; reference.mode=auto computes it first")
    elif reference_source(cfg) == "adapters_off":
        ok("reference: online, the policy's own engine with its LoRA adapters disabled (no second model)")
    else:
        ok("reference: online (a ZeRO-3 inference engine beside the policy)")

    # ---- memory plan for the target GPUs
    settings = settings_from_ds_config(
        policy_ds,
        micro_batch_tokens=cfg.data.max_tokens_per_micro_batch,
        reference=_planned_reference(cfg, reference_free),
        lora=lora,
        reference_offload=cfg.reference.offload,
        grad_checkpointing=cfg.model.gradient_checkpointing,
        logits_chunk_size=cfg.train.logits_chunk_size,
        fused_head=use_fused_head(cfg.train.fused_head, hf_config),
        fused_optimizer=device_type != "cpu",
        dtype_bytes=torch.finfo(dtype).bits // 8,
        seq_tokens=max(1, int(np.mean(lengths))),
        sequence_parallel=sp,
    )
    hardware = Hardware(world_size // gpus_per_node, gpus_per_node, gpu_mem_gib, peak_tflops)
    report.plan = plan_memory(shape, hardware, settings)
    # Step time: rank 0's micro-batches of step 0 at their real token counts.
    rate = settings.mfu * peak_tflops * 1e12
    report.step_seconds = sum(
        micro_batch_flops(shape, dataclasses.replace(settings, micro_batch_tokens=mb.tokens // sp)) / rate
        for mb in packed.for_rank(0)
    )
    report.recommendation = recommend(shape, hardware, settings, min_tokens=-(-2 * cfg.data.max_length // sp))
    if not report.plan.fits:
        hint = _describe(report.recommendation)
        raise ConfigError(
            f"data.max_tokens_per_micro_batch / model.gradient_checkpointing / --ds offload: the plan needs "
            f"{report.plan.required_bytes / 2**30:.1f} GiB per GPU of {gpu_mem_gib:g} GiB at "
            f"{world_size} ranks; {hint}\n\n{format_plan(report.plan, report.recommendation)}"
        )
    return report


def _describe(recommendation: dict | None) -> str:
    if recommendation is None:
        return "nothing fits at this world size: add nodes or use GPUs with more memory"
    r = recommendation
    changes = [
        f"data.max_tokens_per_micro_batch={r['micro_batch_tokens']}",
        f"model.gradient_checkpointing={str(r['grad_checkpointing']).lower()}",
    ]
    if r["offload_optimizer"]:
        changes.append("an optimizer-offload ds_config (offload_optimizer: cpu)")
    if r["offload_param"]:
        changes.append("parameter offload (offload_param: cpu)")
    return "this fits: " + ", ".join(changes)


def format_report(report: DryRunReport) -> str:
    lines = [f"dry run for {report.world_size} rank(s): every check passed", ""]
    lines += [f"  ok  {line}" for line in report.checks]
    if report.plan is not None:
        lines += ["", format_plan(report.plan, report.recommendation)]
        lines.append(f"step 0 on rank 0 [assumption: MFU]: about {report.step_seconds:.2f} s of compute")
    return "\n".join(lines)


def _planned_reference(cfg: Config, reference_free: bool) -> str:
    """The planner's reference for this run: none, cached, adapters_off (LoRA's disabled adapters) or
    online (an engine of its own)."""
    if reference_free:
        return "none"
    if cfg.reference.mode != "online":
        return "cached"
    return "adapters_off" if reference_source(cfg) == "adapters_off" else "online"
