"""The training recipe: setup -> loop -> finish. It composes the pieces; it reads top to bottom.

One optimizer step = `train.pairs_per_step` pairs (global), packed into token-budget micro-batches,
the same number on every rank (fillers with weight 0 where a rank is short). Each micro-batch:
policy forward -> token_stats -> per-sequence sums -> reference log-probs -> preference_loss; its
summed loss is scaled by world_size / global_pairs so that, after DeepSpeed averages gradients over
ranks, the step's gradient is that of the mean over all pairs (DESIGN.md §5). The accumulation
boundary is each rank's last micro-batch. Metrics: one all-reduce and one host sync per step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from hdpo_ds import dist, engine
from hdpo_ds.config import Config, ConfigError, flatten, to_dict
from hdpo_ds.data import (
    PackedBatch,
    PairSampler,
    collate,
    load_records,
    plan_stats,
    plan_step,
    tokenize_pairs,
)
from hdpo_ds.logprobs import segment_sums, token_logps, token_stats
from hdpo_ds.losses import preference_loss
from hdpo_ds.metrics import MlflowLogger, NullLogger, StepAccumulator, package_versions, resolve_tracking_uri
from hdpo_ds.models import check_model_source, load_model, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "lr_multiplier", "train"]


@dataclass
class TrainResult:
    run_id: str | None
    tracking_uri: str | None
    output_dir: str
    steps: int
    losses: list[float] = field(default_factory=list)


def lr_multiplier(
    step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float
) -> float:
    """Linear warmup over `warmup_steps`, then cosine / linear decay to `min_lr_ratio` at `max_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * decay


@dataclass
class _BatchResult:
    """One micro-batch's per-pair values, each (num_pairs,) in this batch's pair order."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    lp: tuple[torch.Tensor, torch.Tensor]
    ref: tuple[torch.Tensor, torch.Tensor]
    tokens: tuple[torch.Tensor, torch.Tensor]
    token_sums: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def _pair_order(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence indices of each pair's chosen and rejected sequence, in pair order."""
    seqs = torch.arange(batch.num_seqs, device=batch.pair_index.device)
    chosen = torch.empty(batch.num_pairs, dtype=torch.long, device=seqs.device)
    rejected = torch.empty_like(chosen)
    chosen[batch.pair_index[batch.is_chosen]] = seqs[batch.is_chosen]
    rejected[batch.pair_index[~batch.is_chosen]] = seqs[~batch.is_chosen]
    return chosen, rejected


def _run_batch(cfg: Config, policy, reference, batch: PackedBatch, *, track_grad: bool) -> _BatchResult:
    """Forward the policy (and the reference) on one micro-batch and compute the per-pair losses."""
    inputs = batch.model_inputs()
    mask = batch.labels != -100
    num_seqs = batch.num_seqs
    with torch.no_grad():
        ref_logits = reference(**inputs).logits
        ref_tokens = token_logps(ref_logits, batch.labels, chunk_size=cfg.train.logits_chunk_size)
        ref_seq = segment_sums(ref_tokens, batch.seq_index, num_seqs, mask=mask, dtype=torch.float32).sums
        del ref_logits
    with torch.set_grad_enabled(track_grad):
        logits = policy(**inputs).logits
        stats = token_stats(
            logits, batch.labels, top_k=cfg.train.top_k, chunk_size=cfg.train.logits_chunk_size
        )
        seq = segment_sums(stats.logps, batch.seq_index, num_seqs, mask=mask, dtype=torch.float32)
    monitor_sums = {
        name: segment_sums(
            getattr(stats, name), batch.seq_index, num_seqs, mask=mask, dtype=torch.float32
        ).sums
        for name in ("entropy", "topk_mass", "topk_entropy")
    }
    chosen, rejected = _pair_order(batch)
    out = preference_loss(
        seq.sums[chosen],
        seq.sums[rejected],
        ref_seq[chosen],
        ref_seq[rejected],
        loss_type=cfg.loss.type,
        beta=cfg.loss.beta,
        alpha=cfg.loss.alpha,
        label_smoothing=cfg.loss.label_smoothing,
        f_alpha=cfg.loss.f_alpha,
        chosen_token_counts=seq.counts[chosen],
        nll_weight=cfg.loss.nll_weight,
    )
    return _BatchResult(
        losses=out.losses,
        chosen_rewards=out.chosen_rewards,
        rejected_rewards=out.rejected_rewards,
        lp=(seq.sums[chosen].detach(), seq.sums[rejected].detach()),
        ref=(ref_seq[chosen], ref_seq[rejected]),
        tokens=(seq.counts[chosen], seq.counts[rejected]),
        token_sums=(
            {k: v[chosen] for k, v in monitor_sums.items()},
            {k: v[rejected] for k, v in monitor_sums.items()},
        ),
    )


def _accumulate(acc: StepAccumulator, result: _BatchResult) -> None:
    acc.add_pairs(
        losses=result.losses.detach(),
        chosen_rewards=result.chosen_rewards,
        rejected_rewards=result.rejected_rewards,
        chosen_logps=result.lp[0],
        rejected_logps=result.lp[1],
        chosen_ref_logps=result.ref[0],
        rejected_ref_logps=result.ref[1],
        chosen_tokens=result.tokens[0],
        rejected_tokens=result.tokens[1],
        chosen_token_sums=result.token_sums[0],
        rejected_token_sums=result.token_sums[1],
    )


def _write_json_atomically(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_before_engines(cfg: Config) -> None:
    """Everything that can be checked without building an engine (the keys are named in errors)."""
    check_model_source(cfg.model)
    if cfg.reference.name_or_path:
        check_model_source(dataclasses.replace(cfg.model, name_or_path=cfg.reference.name_or_path),
                           key="reference.name_or_path")  # fmt: skip
    if cfg.train.save_every or cfg.train.resume not in ("auto", "never"):
        raise ConfigError(
            "train.save_every / train.resume: this version writes no checkpoints yet; set "
            "train.save_every=0 and train.resume=auto or never"
        )


def train(cfg: Config, ds_config_path: str) -> TrainResult:
    """Run the whole recipe. Every rank calls it; rank 0 alone logs to MLflow."""
    # ---- setup: what can fail fast fails before any engine exists
    ds_config = engine.load_ds_config(ds_config_path)
    infer_ds_config = engine.load_ds_config(cfg.reference.ds_config)
    _check_before_engines(cfg)
    tokenizer = load_tokenizer(cfg.model)
    train_records = load_records(
        cfg.data.train_files, split=cfg.data.split or None, rows=cfg.data.rows or None,
        on_bad_record=cfg.data.on_bad_record,
    )  # fmt: skip
    eval_records = (
        load_records(cfg.data.eval_files, split=cfg.data.split or None, rows=cfg.data.eval_rows or None,
                     on_bad_record=cfg.data.on_bad_record)
        if cfg.data.eval_files else None
    )  # fmt: skip

    engine.init_distributed()
    rank, world_size = dist.rank(), dist.world_size()
    device_type = engine.device_type()
    device = engine.current_device()
    cache_dir = cfg.data.cache_dir or os.path.join(cfg.output_dir, "cache")
    if dist.is_main_process():
        os.makedirs(cfg.output_dir, exist_ok=True)

    def tokenize(records):
        return tokenize_pairs(
            records, tokenizer, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
            truncation=cfg.data.truncation, chat_template=cfg.data.chat_template or None, cache_dir=cache_dir,
            is_main_process=dist.is_main_process(), barrier=dist.barrier, on_bad_record=cfg.data.on_bad_record,
        )  # fmt: skip

    train_data = tokenize(train_records)
    eval_data = tokenize(eval_records) if eval_records is not None else None
    sampler = PairSampler(
        train_data.pairs.lengths, pairs_per_step=cfg.train.pairs_per_step, world_size=world_size, rank=rank,
        seed=cfg.train.seed, max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch,
        max_length=cfg.data.max_length, packing=cfg.data.packing,
    )  # fmt: skip

    dtype = engine.resolve_dtype(cfg, ds_config)
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(
        cfg.model.name_or_path if not cfg.model.name_or_path.endswith(".json")
        else os.path.dirname(cfg.model.name_or_path) or ".",
        trust_remote_code=cfg.model.trust_remote_code,
    )  # fmt: skip
    hidden = getattr(model_config, "hidden_size", None)
    policy_ds = engine.fill_ds_config(
        ds_config, cfg, world_size=world_size, device_type=device_type, hidden_size=hidden
    )
    ref_ds = engine.fill_ds_config(
        infer_ds_config,
        cfg,
        world_size=world_size,
        device_type=device_type,
        hidden_size=hidden,
        training=False,
    )
    if cfg.reference.offload:
        ref_ds.setdefault("zero_optimization", {})["offload_param"] = {
            "device": "cpu",
            "pin_memory": device_type != "cpu",
        }

    # ---- models and engines (built inside zero.Init under ZeRO-3: never whole on one rank)
    zero3_handle = engine.zero3_loading(policy_ds)
    loaded = load_model(cfg.model, dtype=dtype, device_type=device_type, seed=cfg.train.seed)
    schedule = dict(warmup_steps=cfg.optim.warmup_steps, max_steps=cfg.train.max_steps,
                    schedule=cfg.optim.schedule, min_lr_ratio=cfg.optim.min_lr_ratio)  # fmt: skip
    policy = engine.build_policy_engine(loaded.model, policy_ds, lambda s: lr_multiplier(s, **schedule))
    zero3_handle = engine.zero3_loading(ref_ds)
    ref_model = load_model(
        cfg.model, dtype=dtype, device_type=device_type, seed=cfg.train.seed,
        name_or_path=cfg.reference.name_or_path or None, for_training=False,
    ).model  # fmt: skip
    reference = engine.build_reference_engine(ref_model, ref_ds)
    del zero3_handle

    # ---- logging (rank 0 only)
    run_logger = NullLogger()
    if dist.is_main_process():
        run_logger = MlflowLogger(resolve_tracking_uri(cfg.logging.tracking_uri), cfg.logging.experiment,
                                  cfg.logging.run_name)  # fmt: skip
        params = {f"config.{k}": v for k, v in flatten(to_dict(cfg)).items()}
        params.update({f"ds_config.{k}": v for k, v in flatten(policy_ds).items()})
        params.update({f"versions.{k}": v for k, v in package_versions().items()})
        params.update({
            "run.world_size": world_size, "run.device": device_type, "run.dtype": str(dtype).removeprefix("torch."),
            "run.attn_implementation": loaded.attn_implementation, "run.ds_config_path": ds_config_path,
            "run.train_pairs": len(train_data.pairs), "run.eval_pairs": len(eval_data.pairs) if eval_data else 0,
            "run.torch_threads": torch.get_num_threads(),
        })  # fmt: skip
        for name, count in {**train_records.skipped, **train_data.stats}.items():
            params[f"data.{name}"] = count
        run_logger.log_params(params)
        run_logger.log_json_artifact("ds_config.json", policy_ds)
        run_logger.log_json_artifact("ds_config_reference.json", ref_ds)
        run_logger.log_json_artifact("config.json", to_dict(cfg))
        logger.info("attention implementation: %s; MLflow run %s at %s", loaded.attn_implementation,
                    run_logger.run_id, run_logger.tracking_uri)  # fmt: skip

    progress = None
    if dist.is_main_process() and cfg.logging.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.max_steps, desc="H-DPO" if cfg.loss.type == "hdpo" else cfg.loss.type)

    # ---- the loop
    result = TrainResult(run_logger.run_id, run_logger.tracking_uri, cfg.output_dir, 0)
    step = 0
    steps = iter(())
    while step < cfg.train.max_steps:
        assignment = next(steps, None)
        if assignment is None:
            steps = iter(sampler)  # the next epoch
            continue
        started = time.perf_counter()
        lr = policy.get_lr()[0]  # the rate this step's update uses (the scheduler advances in step())
        policy.train()
        acc = StepAccumulator(device)
        micro_batches = assignment.micro_batches
        scale = world_size / assignment.num_pairs
        real_tokens = 0
        for i, mb in enumerate(micro_batches):
            batch = collate(assignment.pairs(train_data.pairs), mb, pad_token_id=tokenizer.pad_token_id,
                            packing=cfg.data.packing).to(device)  # fmt: skip
            policy.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            out = _run_batch(cfg, policy, reference, batch, track_grad=True)
            # A filler runs a real forward and backward (ZeRO-3 needs every rank in it) but weighs 0.
            policy.backward(out.losses.sum() * (scale * batch.weight))
            if i == len(micro_batches) - 1 and step in cfg.train.dump_gradients_at:
                _dump_gradients(policy, cfg.output_dir, step)
            policy.step()
            if not mb.filler:
                _accumulate(acc, out)
                real_tokens += batch.num_real_tokens
        acc.add("real_tokens", real_tokens)
        sums = dist.reduce_sums(acc.sums, device=device)  # the step's one collective and host sync
        elapsed = time.perf_counter() - started
        metrics = acc.metrics(sums)
        stats = plan_stats(assignment.plan)
        metrics.update({
            "alpha": cfg.loss.alpha, "grad_norm": _grad_norm(policy), "lr": lr,
            "tokens_per_second": sums["real_tokens"] / elapsed, "padding_fraction": stats.padding_fraction,
            "packing_fill": stats.fill,
        })  # fmt: skip
        run_logger.log_metrics(metrics, step=step)
        result.losses.append(metrics["loss"])
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.3f}",
                                 acc=f"{metrics['rewards/accuracies']:.2f}",
                                 tok_s=f"{metrics['tokens_per_second']:.0f}")  # fmt: skip
        step += 1
        if (
            eval_data is not None
            and cfg.train.eval_every
            and step % cfg.train.eval_every == 0
            and step < cfg.train.max_steps
        ):
            run_logger.log_metrics(_evaluate(cfg, policy, reference, eval_data, tokenizer, device), step=step)

    if eval_data is not None:
        run_logger.log_metrics(_evaluate(cfg, policy, reference, eval_data, tokenizer, device), step=step)
    if progress is not None:
        progress.close()
    result.steps = step
    run_logger.finish("FINISHED")
    if dist.is_main_process():
        _write_json_atomically(
            os.path.join(cfg.output_dir, "run_info.json"),
            {"run_id": result.run_id, "tracking_uri": result.tracking_uri, "steps": step,
             "experiment": cfg.logging.experiment, "world_size": world_size,
             "attn_implementation": loaded.attn_implementation, "final_loss": result.losses[-1]},
        )  # fmt: skip
    dist.barrier()
    return result


def _grad_norm(policy) -> float:
    norm = policy.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _dump_gradients(policy, output_dir: str, step: int) -> None:
    """Diagnostics (train.dump_gradients_at): the full gathered gradient of this step, before the
    optimizer update. Collective; rank 0 writes output_dir/diagnostics/grads_step<N>.pt."""
    grads = engine.full_gradients(policy)
    if dist.is_main_process():
        path = os.path.join(output_dir, "diagnostics")
        os.makedirs(path, exist_ok=True)
        torch.save(grads, os.path.join(path, f"grads_step{step}.pt"))


@torch.no_grad()
def _evaluate(cfg: Config, policy, reference, eval_data, tokenizer, device) -> dict[str, float]:
    """Metrics on the held-out pairs, under `eval/`. Every rank runs the same number of forwards."""
    policy.eval()
    lengths = eval_data.pairs.lengths
    count = len(lengths) if not cfg.train.eval_pairs else min(cfg.train.eval_pairs, len(lengths))
    positions = np.arange(count)
    acc = StepAccumulator(device)
    # Chunks of pairs_per_step pairs keep each plan (and its fillers) to the training step's size.
    for start in range(0, count, cfg.train.pairs_per_step):
        chunk = positions[start : start + cfg.train.pairs_per_step]
        plan = plan_step(lengths[chunk], world_size=dist.world_size(),
                         max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch, packing=cfg.data.packing)  # fmt: skip
        view = [eval_data.pairs[int(i)] for i in chunk]
        for mb in plan.for_rank(dist.rank()):
            batch = collate(view, mb, pad_token_id=tokenizer.pad_token_id, packing=cfg.data.packing).to(
                device
            )
            out = _run_batch(cfg, policy, reference, batch, track_grad=False)
            if not mb.filler:
                _accumulate(acc, out)
    policy.train()
    return acc.metrics(dist.reduce_sums(acc.sums, device=device), prefix="eval/")
