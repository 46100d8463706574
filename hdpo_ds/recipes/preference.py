"""The training recipe: setup -> loop -> finish. It composes the pieces; it reads top to bottom.

One optimizer step = `train.pairs_per_step` pairs (global), packed into token-budget micro-batches,
the same number on every rank (fillers with weight 0 where a rank is short). Each micro-batch:
policy forward -> token_stats -> per-sequence sums -> reference log-probs -> preference_loss; its
summed loss is scaled by world_size / global_pairs so that, after DeepSpeed averages gradients over
ranks, the step's gradient is that of the mean over all pairs (docs/design.md §5). The accumulation
boundary is each rank's last micro-batch. Before the optimizer update one collective agrees whether
any rank saw a non-finite loss or gradient partition (then every rank skips the update); after it, one
all-reduce carries all of the step's metrics (the gradient norm too), and whether any rank got a stop
signal (hdpo_ds/runtime/stop.py: then every rank
checkpoints after that step and leaves with stop.EXIT_STOPPED). Checkpoints every `train.save_every`
steps and at the end; resume from the latest complete one (hdpo_ds/runtime/checkpoint.py). Each evaluation
feeds the over-optimisation detectors (hdpo_ds/monitoring/detectors.py: alerts, an optional clean stop, the best
checkpoint); with loss.alpha=auto each step's (or each evaluation's) reduced entropy feeds the alpha
controller, whose alpha the next step trains at.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from hdpo_ds.common.atomic import write_json, write_text
from hdpo_ds.common.versions import package_versions
from hdpo_ds.config import Config, ConfigError, flatten, to_dict
from hdpo_ds.data import IndexedPairs, PackedBatch, PairSampler, collate, pack_step, packing_stats
from hdpo_ds.monitoring.alpha import AlphaController
from hdpo_ds.monitoring.detectors import MonitorSuite
from hdpo_ds.objectives.logprobs import segment_sums, token_kl, token_stats
from hdpo_ds.objectives.losses import TDPO_LOSS_TYPES, preference_loss, tdpo_loss
from hdpo_ds.recipes.precompute import build_reference_engine, ensure_reference_caches
from hdpo_ds.recipes.splits import load_split_records, tokenize_split
from hdpo_ds.reference.sources import CachedReference, pair_sequence_indices
from hdpo_ds.runtime import checkpoint, dist, engine, export, stop
from hdpo_ds.runtime.models import check_model_source, load_model, load_model_config, load_tokenizer
from hdpo_ds.tracking.metrics import StepAccumulator, peak_memory_mib
from hdpo_ds.tracking.mlflow_logger import MlflowLogger, NullLogger

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "lr_multiplier", "resume_point", "train"]


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
    kl: tuple[torch.Tensor, torch.Tensor] | None = None  # TDPO's sequential KL per pair


def _run_batch(
    cfg: Config, policy, reference, batch: PackedBatch, *, track_grad: bool, alpha: float
) -> _BatchResult:
    """Forward the policy on one micro-batch, get the reference's values (engine or cache), and
    compute the per-pair losses (H-DPO with this step's `alpha`: fixed, or the controller's)."""
    inputs = batch.model_inputs()
    mask = batch.labels != -100
    num_seqs = batch.num_seqs
    tdpo = cfg.loss.type in TDPO_LOSS_TYPES
    if tdpo:  # TDPO needs the reference's whole next-token distributions, not just sums
        ref_logits = reference.logits(batch)
        ref_seq = reference.sums_from_logits(ref_logits, batch).sums
    else:
        ref_seq = reference.sequence_logps(batch)
    with torch.set_grad_enabled(track_grad):
        logits = policy(**inputs).logits
        stats = token_stats(
            logits, batch.labels, top_k=cfg.train.top_k, chunk_size=cfg.train.logits_chunk_size
        )
        seq = segment_sums(stats.logps, batch.seq_index, num_seqs, mask=mask, dtype=torch.float32)
        if tdpo:
            kl_tokens = token_kl(logits, ref_logits, batch.labels, chunk_size=cfg.train.logits_chunk_size)
            seq_kl = segment_sums(kl_tokens, batch.seq_index, num_seqs, mask=mask, dtype=torch.float32).sums
            del ref_logits
    monitor_sums = {
        name: segment_sums(
            getattr(stats, name), batch.seq_index, num_seqs, mask=mask, dtype=torch.float32
        ).sums
        for name in ("entropy", "topk_mass", "topk_entropy")
    }
    chosen, rejected = pair_sequence_indices(batch)
    if tdpo:
        out = tdpo_loss(
            seq.sums[chosen],
            seq.sums[rejected],
            ref_seq[chosen],
            ref_seq[rejected],
            seq_kl[chosen],
            seq_kl[rejected],
            loss_type=cfg.loss.type,
            beta=cfg.loss.beta,
            tdpo_alpha=cfg.loss.tdpo_alpha,
        )
        kl = (out.chosen_kl, out.rejected_kl)
    else:
        kl = None
        out = preference_loss(
            seq.sums[chosen],
            seq.sums[rejected],
            ref_seq[chosen],
            ref_seq[rejected],
            loss_type=cfg.loss.type,
            beta=cfg.loss.beta,
            alpha=alpha,
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
        kl=kl,
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
    if result.kl is not None:
        acc.add("kl/chosen", result.kl[0].sum())
        acc.add("kl/rejected", result.kl[1].sum())


def _check_before_engines(cfg: Config) -> None:
    """Everything that can be checked without building an engine (the keys are named in errors)."""
    if cfg.reference.rebuild_stale and cfg.reference.mode == "cached":
        raise ConfigError(
            "reference.rebuild_stale: has no effect with reference.mode=cached (training never computes the "
            "cache); use reference.mode=auto, or rebuild it with launch/precompute_ref.py reference.rebuild_stale=true"
        )
    check_model_source(cfg.model)
    if cfg.reference.name_or_path:
        check_model_source(
            dataclasses.replace(cfg.model, name_or_path=cfg.reference.name_or_path),
            key="reference.name_or_path",
        )


def train(cfg: Config, ds_config_path: str) -> TrainResult:
    """Run the whole recipe. Every rank calls it; rank 0 alone logs to MLflow."""
    # ---- setup: what can fail fast fails before any engine exists
    ds_config = engine.load_ds_config(ds_config_path)
    infer_ds_config = engine.load_ds_config(cfg.reference.ds_config)
    _check_before_engines(cfg)
    tokenizer = load_tokenizer(cfg.model)
    records = load_split_records(cfg)

    engine.init_distributed(cfg.train.dist_timeout_minutes)
    rank, world_size = dist.rank(), dist.world_size()
    device_type = engine.device_type()
    device = engine.current_device()
    if dist.is_main_process():
        os.makedirs(cfg.output_dir, exist_ok=True)
    splits = {name: tokenize_split(cfg, name, recs, tokenizer) for name, recs in records.items()}
    train_data = splits["train"].data
    eval_data = splits["eval"].data if "eval" in splits else None
    sampler = PairSampler(
        train_data.pairs.lengths,
        pairs_per_step=cfg.train.pairs_per_step,
        world_size=world_size,
        rank=rank,
        seed=cfg.train.seed,
        max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch,
        max_length=cfg.data.max_length,
        packing=cfg.data.packing,
    )
    resume_folder, resume_state = resume_point(cfg, world_size)

    dtype = engine.resolve_dtype(cfg, ds_config)
    hidden = getattr(load_model_config(cfg.model), "hidden_size", None)
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
        dtype=dtype,
    )

    # ---- models and engines (built inside zero.Init under ZeRO-3: never whole on one rank)
    zero3_handle = engine.zero3_loading(policy_ds)
    loaded = load_model(
        cfg.model, dtype=dtype, device_type=device_type, seed=cfg.train.seed, packing=cfg.data.packing
    )
    del zero3_handle
    schedule = dict(
        warmup_steps=cfg.optim.warmup_steps,
        max_steps=cfg.train.max_steps,
        schedule=cfg.optim.schedule,
        min_lr_ratio=cfg.optim.min_lr_ratio,
    )
    policy = engine.build_policy_engine(loaded.model, policy_ds, lambda s: lr_multiplier(s, **schedule))
    # The reference: its own engine (online), or cached values and no engine at all (cached / auto).
    cache_actions: dict[str, str] = {}
    if cfg.reference.mode == "online":
        online = build_reference_engine(cfg, ref_ds, dtype, device_type)
        references = dict.fromkeys(splits, online)
    else:
        caches, cache_actions = ensure_reference_caches(
            cfg,
            splits,
            ref_ds=ref_ds,
            dtype=dtype,
            device_type=device_type,
            device=device,
            pad_token_id=tokenizer.pad_token_id,
            compute_missing=cfg.reference.mode == "auto",
        )
        references = {name: CachedReference(cache, device) for name, cache in caches.items()}

    step, nonfinite = 0, {"skipped_total": 0, "consecutive": 0}
    monitors = MonitorSuite(cfg.monitors)
    controller = _alpha_controller(cfg)
    if resume_folder:
        checkpoint.load(policy, resume_folder)
        # optim.* as configured (not as the optimizer state restored them); a change needs resume_force
        engine.apply_optimizer_settings(
            policy, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay
        )
        step, nonfinite = resume_state["step"], resume_state["nonfinite"]
        sampler.load_state_dict(resume_state["sampler"])
        if resume_state.get("monitors"):  # absent in checkpoints written before the monitors existed
            monitors.load_state_dict(resume_state["monitors"], resume_step=step)
            if dist.is_main_process():  # alerts after the checkpoint are redone: drop their lines
                _write_alerts(cfg.output_dir, monitors.alerts)
        if controller is not None and resume_state.get("alpha_controller"):
            controller.load_state_dict(resume_state["alpha_controller"])
        logger.info("resumed from %s at step %d", resume_folder, step)

    # ---- logging (rank 0 only)
    run_logger = NullLogger()
    if dist.is_main_process() and resume_state:
        run_logger = MlflowLogger.for_run(cfg, run_id=resume_state["mlflow_run_id"])
        run_logger.reopen(step)
    elif dist.is_main_process():
        run_logger = MlflowLogger.for_run(cfg)
        params = {f"config.{k}": v for k, v in flatten(to_dict(cfg)).items()}
        params.update({f"ds_config.{k}": v for k, v in flatten(policy_ds).items()})
        params.update({f"versions.{k}": v for k, v in package_versions().items()})
        params.update(
            {
                "run.world_size": world_size,
                "run.device": device_type,
                "run.dtype": str(dtype).removeprefix("torch."),
                "run.attn_implementation": loaded.attn_implementation,
                "run.ds_config_path": ds_config_path,
                "run.train_pairs": len(train_data.pairs),
                "run.eval_pairs": len(eval_data.pairs) if eval_data else 0,
                "run.torch_threads": torch.get_num_threads(),
            }
        )
        for name, count in {**splits["train"].records.skipped, **train_data.stats}.items():
            params[f"data.{name}"] = count
        params["run.reference_mode"] = cfg.reference.mode
        params.update({f"run.reference_cache.{name}": action for name, action in cache_actions.items()})
        run_logger.log_params(params)
        run_logger.log_json_artifact("ds_config.json", policy_ds)
        run_logger.log_json_artifact("ds_config_reference.json", ref_ds)
        run_logger.log_json_artifact("config.json", to_dict(cfg))
        logger.info(
            "attention implementation: %s; MLflow run %s at %s",
            loaded.attn_implementation,
            run_logger.run_id,
            run_logger.tracking_uri,
        )

    progress = None
    if dist.is_main_process() and cfg.logging.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=cfg.train.max_steps,
            initial=step,
            desc="H-DPO" if cfg.loss.type == "hdpo" else cfg.loss.type,
        )

    def save_checkpoint() -> None:
        refuse_nonfinite_weights(policy, device, step, cfg.output_dir, run_logger)
        state = {
            "step": step,
            "sampler": sampler.state_dict(),
            "mlflow_run_id": run_logger.run_id,
            "config": to_dict(cfg),
            "world_size": world_size,
            "dtype": str(dtype).removeprefix("torch."),
            "nonfinite": dict(nonfinite),
            "monitors": monitors.state_dict(),
            "alpha_controller": controller.state_dict() if controller else None,
        }
        # Every rank needs the same client state; only rank 0 knows the MLflow run id.
        state["mlflow_run_id"] = dist.broadcast_object(state["mlflow_run_id"])
        # The best evaluated checkpoint (this one included) is kept when older ones are pruned.
        best = monitors.best(
            cfg.monitors.best_metric,
            cfg.monitors.best_mode,
            candidates={*checkpoint.complete_steps(cfg.output_dir), step},
        )
        protected = {checkpoint.tag_for(best[0])} if best else set()
        checkpoint.save(
            policy,
            cfg.output_dir,
            step,
            state,
            keep=cfg.train.keep_checkpoints,
            tokenizer=tokenizer,
            protected=protected,
        )
        if best and dist.is_main_process():
            checkpoint.mark_best(cfg.output_dir, best[0], cfg.monitors.best_metric, best[1])
        nonlocal last_saved
        last_saved = step

    def evaluate_and_watch() -> bool:
        """Evaluate, feed the detectors (and the controller, with alpha_update=eval); True: stop here."""
        metrics = _evaluate(cfg, policy, references["eval"], eval_data, tokenizer, device, alpha=alpha)
        if controller is not None and cfg.loss.alpha_update == "eval":
            # the loop reads controller.alpha at each step start: the next step trains at the new value
            controller.update(metrics["eval/entropy/chosen"])
            metrics.update(_controller_metrics(controller, cfg))
        run_logger.log_metrics(metrics, step=step)
        alerts = monitors.observe(step, metrics)
        if alerts and dist.is_main_process():
            _report_alerts(alerts, cfg.output_dir, run_logger, progress)
        return bool(alerts) and cfg.monitors.on_alert == "stop"

    # ---- the loop
    result = TrainResult(run_logger.run_id, run_logger.tracking_uri, cfg.output_dir, 0)
    faults = _Faults.from_env()
    steps = iter(())
    alpha = controller.alpha if controller is not None else cfg.loss.alpha
    last_saved, stopped_by_alert = None, False
    while step < cfg.train.max_steps:
        assignment = next(steps, None)
        if assignment is None:
            steps = iter(sampler)  # the next epoch, or the rest of the resumed one
            continue
        faults.maybe_kill(step)
        # Read at every step: the controller moves it after a step or an evaluation (loss.alpha_update).
        alpha = controller.alpha if controller is not None else cfg.loss.alpha
        started = time.perf_counter()
        lr = policy.get_lr()[0]  # the rate this step's update uses (the scheduler advances in step())
        policy.train()
        acc = StepAccumulator(device, with_kl=cfg.loss.type in TDPO_LOSS_TYPES)
        micro_batches = assignment.micro_batches
        scale = world_size / assignment.num_pairs
        real_tokens = 0
        bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss or gradient here
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            batch = collate(
                assignment.pairs(train_data.pairs),
                mb,
                pad_token_id=tokenizer.pad_token_id,
                packing=cfg.data.packing,
            ).to(device)
            policy.set_gradient_accumulation_boundary(last)
            planted = faults.plant_nan_gradient(step, i, policy)
            out = _run_batch(cfg, policy, references["train"], batch, track_grad=True, alpha=alpha)
            out.losses = faults.plant_nan(step, i, out.losses)
            finite = torch.isfinite(out.losses).all()
            bad |= ~finite
            # A filler runs a real forward and backward (ZeRO-3 needs every rank in it) but weighs 0;
            # a non-finite loss backs off to 0 here and the step is then skipped on all ranks.
            loss = torch.where(
                finite, out.losses.sum(), torch.zeros((), device=device, dtype=out.losses.dtype)
            )
            policy.backward(loss * (scale * batch.weight))
            if planted is not None:
                planted.remove()
            if not last:
                policy.step()
            else:
                # A finite loss can still give a NaN/Inf gradient (bf16 overflow inside the graph): this
                # rank's reduced gradient partition is checked too, in the same agreement.
                bad |= ~engine.local_all_finite(policy, "grad", device)
                skip_step = dist.all_agree(bad, device=device)  # one collective decides for all ranks
                if skip_step:
                    engine.discard_gradients(
                        policy
                    )  # no update: optimizer, scheduler, step counters stay put
                else:
                    if step in cfg.train.dump_gradients_at:
                        _dump_gradients(policy, cfg.output_dir, step)
                    policy.step()
            if not mb.filler:
                _accumulate(acc, out)
                real_tokens += batch.num_real_tokens
        acc.add("real_tokens", real_tokens)
        acc.add("stop_requests", 1.0 if stop.received() else 0.0)  # rides in the metrics collective below
        # The same on every rank: summed over ranks here (no host sync of its own), divided back below.
        norm = float("nan") if skip_step else _grad_norm(policy)
        # The step's second collective (the first was the skip agreement) and second host sync.
        sums = dist.reduce_sums({**acc.sums, "grad_norm": norm}, device=device)
        elapsed = time.perf_counter() - started
        metrics = acc.metrics(sums)
        stats = packing_stats(assignment.packed)
        if skip_step:
            nonfinite["skipped_total"] += 1
            nonfinite["consecutive"] += 1
            logger.warning(
                "step %d: non-finite loss or gradient on some rank; the update was skipped (%d in a row, "
                "%d in all)",
                step,
                nonfinite["consecutive"],
                nonfinite["skipped_total"],
            )
        else:
            nonfinite["consecutive"] = 0
        metrics.update(
            {
                "nonfinite/skipped_steps": nonfinite["skipped_total"],
                "alpha": alpha,
                "grad_norm": sums["grad_norm"] / world_size,
                "lr": lr,
                "tokens_per_second": sums["real_tokens"] / elapsed,
                "padding_fraction": stats.padding_fraction,
                "packing_fill": stats.fill,
                "tokens": sums["real_tokens"],
                "step_time_s": elapsed,
            }
        )
        if controller is not None and cfg.loss.alpha_update == "step":
            # identical inputs on every rank (globally reduced), so every rank computes the same next alpha
            controller.update(metrics["entropy/chosen"])
            metrics.update(_controller_metrics(controller, cfg))
        monitors.record_train(step, metrics)
        run_logger.log_metrics(metrics, step=step)
        result.losses.append(metrics["loss"])
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                margin=f"{metrics['rewards/margins']:.3f}",
                acc=f"{metrics['rewards/accuracies']:.2f}",
                tok_s=f"{metrics['tokens_per_second']:.0f}",
            )
        step += 1
        if nonfinite["consecutive"] >= cfg.train.max_nonfinite_steps:
            # The weights are those of the last good step: skipped steps never updated them.
            save_checkpoint()
            run_logger.finish("FAILED")
            raise NonFiniteTrainingError(
                f"{nonfinite['consecutive']} consecutive steps had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); stopped at step {step} with a good "
                f"checkpoint in {checkpoint.checkpoint_root(cfg.output_dir)}"
            )
        if (
            eval_data is not None
            and cfg.train.eval_every
            and step % cfg.train.eval_every == 0
            and step < cfg.train.max_steps
            and evaluate_and_watch()
        ):
            stopped_by_alert = True  # monitors.on_alert=stop: end cleanly here (the final part below)
            break
        saving = bool(cfg.train.save_every) and step % cfg.train.save_every == 0
        stopping = sums["stop_requests"] > 0  # a signal on any rank: the same decision on every rank
        if (saving or stopping) and step < cfg.train.max_steps:
            save_checkpoint()
            if stopping:
                _stop_after_checkpoint(cfg, step, int(sums["stop_requests"]), world_size, run_logger)

    # A run resumed from its own final checkpoint has nothing left to do: no second final evaluation,
    # checkpoint or export (they exist already).
    finished_before = resume_state is not None and resume_state["step"] >= cfg.train.max_steps
    if finished_before:
        logger.info("the checkpoint is already at train.max_steps=%d: nothing to train", cfg.train.max_steps)
    elif eval_data is not None and not stopped_by_alert:  # a stop came right after an evaluation
        evaluate_and_watch()
    if progress is not None:
        progress.close()
    if not finished_before:
        if last_saved != step:
            save_checkpoint()
        if cfg.train.export_hf:
            export.export_hf(policy, tokenizer, os.path.join(cfg.output_dir, "hf"))
    if stopped_by_alert:
        best = checkpoint.read_best(cfg.output_dir)
        logger.warning(
            "monitors.on_alert=stop: stopped at step %d after %s; best checkpoint by %s: %s",
            step,
            ", ".join(monitors.fired),
            cfg.monitors.best_metric,
            best,
        )
        run_logger.set_tags(
            {
                "hdpo_ds.stopped_by_alert": ",".join(monitors.fired),
                "hdpo_ds.best_checkpoint": (best or {}).get("tag", ""),
            }
        )
    if dist.is_main_process() and cfg.monitors.plots and not finished_before:
        _log_plots(monitors, cfg, run_logger)
    memory = dist.gather_objects(peak_memory_mib())
    for key in memory[0]:
        run_logger.log_metrics({f"memory/{key}_max_over_ranks": max(m[key] for m in memory)}, step=step)
    result.steps = step
    run_logger.finish("FINISHED")
    info_path = os.path.join(cfg.output_dir, "run_info.json")
    # A finished run started again trained nothing: its run_info.json (final loss, alerts) stays as it is.
    if dist.is_main_process() and not (finished_before and os.path.exists(info_path)):
        write_json(
            info_path,
            {
                "run_id": result.run_id,
                "tracking_uri": result.tracking_uri,
                "steps": step,
                "experiment": cfg.logging.experiment,
                "world_size": world_size,
                "attn_implementation": loaded.attn_implementation,
                "final_loss": result.losses[-1] if result.losses else None,
                "alerts": [a.to_json() for a in monitors.alerts],
                "stopped_by_alert": stopped_by_alert,
                "best_checkpoint": checkpoint.read_best(cfg.output_dir),
                "final_alpha": controller.alpha if controller is not None else cfg.loss.alpha,
            },
        )
    dist.barrier()
    return result


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive non-finite steps (a good checkpoint was written before stopping), or weights
    that are not finite (then no checkpoint is written)."""


def refuse_nonfinite_weights(policy, device, step: int, output_dir: str, run_logger) -> None:
    """Before any checkpoint: every rank checks its weight partition and all agree, so a checkpoint never
    holds non-finite weights and no rank is left waiting in the save's collectives."""
    if dist.all_agree(~engine.local_all_finite(policy, "weight", device), device=device):
        run_logger.finish("FAILED")
        raise NonFiniteTrainingError(
            f"the weights at step {step} are not finite on some rank; no checkpoint was written (the last "
            f"good one is in {checkpoint.checkpoint_root(output_dir)})"
        )


def _stop_after_checkpoint(cfg: Config, step: int, ranks: int, world_size: int, run_logger) -> None:
    """Every rank, after the stop checkpoint of `step`: note it and raise stop.TrainingStopped. The MLflow
    run stays open (RUNNING): the resumed job reopens it by the id in the checkpoint."""
    folder = os.path.join(checkpoint.checkpoint_root(cfg.output_dir), checkpoint.tag_for(step))
    signals = stop.received()
    logger.warning(
        "stop requested on %d of %d ranks (here: %s): checkpoint %s written; exiting with %d",
        ranks,
        world_size,
        ", ".join(signals) or "none",
        folder,
        stop.EXIT_STOPPED,
    )
    if dist.is_main_process():
        run_logger.set_tags({f"hdpo_ds.stopped_at_step.{int(time.time())}": str(step)})
        stop.write_marker(
            {
                "step": step,
                "checkpoint": folder,
                "ranks_signalled": ranks,
                "world_size": world_size,
                "signals_rank0": signals,
                "exit_code": stop.EXIT_STOPPED,
            }
        )
    raise stop.TrainingStopped(step, folder, signals)


class _Faults:
    """Documented fault injection for tests (docs/checkpoints.md), read from the environment:
    HDPO_FAULT_KILL_AT_STEP=s: rank 0 SIGKILLs its process group (launcher and ranks) as step s starts;
    HDPO_FAULT_NAN_LOSS_AT_STEPS=a,b: rank 0 adds NaN to its first micro-batch's losses at those steps;
    HDPO_FAULT_NAN_GRAD_AT_STEPS=a,b: rank 0 makes one entry of the gradient flowing into its first
    micro-batch's logits NaN at those steps (inside the graph: the loss stays finite)."""

    def __init__(self, kill_at: int | None, nan_at: set[int], nan_grad_at: set[int] = frozenset()) -> None:
        self.kill_at, self.nan_at, self.nan_grad_at = kill_at, nan_at, nan_grad_at

    @classmethod
    def from_env(cls) -> _Faults:
        kill = os.environ.get("HDPO_FAULT_KILL_AT_STEP")

        def steps(name: str) -> set[int]:
            return {int(x) for x in os.environ.get(name, "").split(",") if x.strip()}

        return cls(
            int(kill) if kill else None,
            steps("HDPO_FAULT_NAN_LOSS_AT_STEPS"),
            steps("HDPO_FAULT_NAN_GRAD_AT_STEPS"),
        )

    def maybe_kill(self, step: int) -> None:
        if self.kill_at == step and dist.is_main_process():
            logger.warning("HDPO_FAULT_KILL_AT_STEP=%d: killing the whole job on purpose", step)
            os.killpg(os.getpgid(0), signal.SIGKILL)

    def plant_nan(self, step: int, micro_batch: int, losses: torch.Tensor) -> torch.Tensor:
        if step in self.nan_at and micro_batch == 0 and dist.is_main_process():
            return losses + float("nan")
        return losses

    def plant_nan_gradient(self, step: int, micro_batch: int, policy):
        """A forward hook on the output embedding whose output gets a gradient hook; returns its handle
        (the caller removes it after the backward) or None."""
        if not (step in self.nan_grad_at and micro_batch == 0 and dist.is_main_process()):
            return None

        def poison(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
            return grad

        def on_forward(module, inputs, output):
            if output.requires_grad:
                output.register_hook(poison)

        return policy.module.get_output_embeddings().register_forward_hook(on_forward)


def resume_point(cfg: Config, world_size: int) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from (rank 0 decides), checked against this run before any engine."""
    folder = dist.broadcast_object(
        checkpoint.find_resume_checkpoint(cfg.output_dir, cfg.train.resume)
        if dist.is_main_process()
        else None
    )
    if folder is None:
        return None, None
    state = checkpoint.read_client_state(folder)
    differences = checkpoint.math_differences(flatten(state["config"]), flatten(to_dict(cfg)))
    if differences and not cfg.train.resume_force:
        raise ConfigError(
            f"train.resume: {folder} was trained with a different configuration, and resuming would change the "
            "math (set train.resume_force=true to resume anyway):\n  " + "\n  ".join(differences)
        )
    if differences:
        logger.warning("train.resume_force: resuming %s despite: %s", folder, "; ".join(differences))
    if state["world_size"] != world_size:
        raise checkpoint.CheckpointError(
            f"train.resume: {folder} was written by {state['world_size']} ranks and this run has {world_size}; "
            "ZeRO-3 shards do not reload across world sizes (convert it with DeepSpeed's universal checkpoint "
            "tools, or resume with the same world size)"
        )
    return folder, state


def _grad_norm(policy) -> torch.Tensor | float:
    """The step's global gradient norm as DeepSpeed computed it (a tensor: read without a host sync)."""
    norm = policy.get_global_grad_norm()
    return float("nan") if norm is None else norm


def _dump_gradients(policy, output_dir: str, step: int) -> None:
    """Diagnostics (train.dump_gradients_at): the full gathered gradient of this step, before the
    optimizer update. Collective; rank 0 writes output_dir/diagnostics/grads_step<N>.pt."""
    grads = engine.full_gradients(policy)
    if dist.is_main_process():
        path = os.path.join(output_dir, "diagnostics")
        os.makedirs(path, exist_ok=True)
        torch.save(grads, os.path.join(path, f"grads_step{step}.pt"))


@torch.no_grad()
def _evaluate(
    cfg: Config, policy, reference, eval_data, tokenizer, device, *, alpha: float
) -> dict[str, float]:
    """Metrics on the held-out pairs, under `eval/`. Every rank runs the same number of forwards."""
    policy.eval()
    lengths = eval_data.pairs.lengths
    count = len(lengths) if not cfg.train.eval_pairs else min(cfg.train.eval_pairs, len(lengths))
    positions = np.arange(count)
    acc = StepAccumulator(device, with_kl=cfg.loss.type in TDPO_LOSS_TYPES)
    # Chunks of pairs_per_step pairs keep each packing (and its fillers) to the training step's size.
    for start in range(0, count, cfg.train.pairs_per_step):
        chunk = positions[start : start + cfg.train.pairs_per_step]
        packed = pack_step(
            lengths[chunk],
            world_size=dist.world_size(),
            max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch,
            packing=cfg.data.packing,
        )
        view = IndexedPairs(eval_data.pairs, chunk)  # this rank reads only its own micro-batches' pairs
        for mb in packed.for_rank(dist.rank()):
            batch = collate(view, mb, pad_token_id=tokenizer.pad_token_id, packing=cfg.data.packing).to(
                device
            )
            out = _run_batch(cfg, policy, reference, batch, track_grad=False, alpha=alpha)
            if not mb.filler:
                _accumulate(acc, out)
    policy.train()
    return acc.metrics(dist.reduce_sums(acc.sums, device=device), prefix="eval/")


def _controller_metrics(controller: AlphaController, cfg: Config) -> dict[str, float]:
    return {
        "alpha/next": controller.alpha,
        "alpha/entropy_smoothed": controller.smoothed,
        "alpha/target_entropy": cfg.loss.target_entropy,
    }


def _alpha_controller(cfg: Config) -> AlphaController | None:
    if cfg.loss.alpha != "auto":
        return None
    loss = cfg.loss
    return AlphaController(
        target=loss.target_entropy,
        alpha_init=loss.alpha_init,
        alpha_min=loss.alpha_min,
        alpha_max=loss.alpha_max,
        gain=loss.alpha_gain,
        integral_gain=loss.alpha_integral_gain,
        max_change=loss.alpha_max_change,
        ema_decay=loss.alpha_ema,
    )


def _report_alerts(alerts, output_dir: str, run_logger, progress) -> None:
    """Rank 0: a warning, an MLflow tag and a line in output_dir/alerts.jsonl (also an artifact) per alert."""
    path = _write_alerts(output_dir, alerts, append=True)
    for alert in alerts:
        logger.warning("monitor alert at step %d: %s: %s", alert.step, alert.detector, alert.message)
    run_logger.set_tags({f"alert.{a.detector}": f"step {a.step}: {a.message}" for a in alerts})
    run_logger.log_artifact(path)
    if progress is not None:
        progress.write(f"ALERT step {alerts[0].step}: " + "; ".join(a.detector for a in alerts))
        progress.set_description(f"{progress.desc.split(' [')[0]} [alert: {alerts[-1].detector}]")


def _write_alerts(output_dir: str, alerts, append: bool = False) -> str:
    """output_dir/alerts.jsonl: one JSON line per alert, appended, or rewritten atomically."""
    path = os.path.join(output_dir, "alerts.jsonl")
    lines = "".join(json.dumps(a.to_json(), sort_keys=True) + "\n" for a in alerts)
    if append:
        with open(path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
    elif lines or os.path.exists(path):
        write_text(path, lines)
    return path


def _log_plots(monitors: MonitorSuite, cfg: Config, run_logger) -> None:
    """PNG plots of the monitors (hdpo_ds/tracking/report.py) under output_dir/plots, logged as artifacts."""
    from hdpo_ds.tracking.report import render

    try:
        paths = render(
            monitors.train_history,
            monitors.history,
            [a.to_json() for a in monitors.alerts],
            os.path.join(cfg.output_dir, "plots"),
            title=cfg.logging.run_name or cfg.output_dir,
        )
    except Exception:  # plots are a convenience: a plotting failure must not fail a finished run
        logger.exception(
            "rendering the monitor plots failed; `python -m hdpo_ds.tracking.report RUN_ID` can retry"
        )
        return
    for path in paths:
        run_logger.log_artifact(path, "plots")
