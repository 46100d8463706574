"""Preference training (H-DPO and its siblings) as a recipe object: setup, one training step, evaluate,
save, finish (docs/design.md §6). It composes the layers; `train` runs it end to end.

One optimizer step = `train.pairs_per_step` pairs (global), packed into token-budget micro-batches,
the same number on every rank (fillers with weight 0 where a rank is short). Each micro-batch:
policy forward -> token_stats -> per-sequence sums -> the reference's values (what the objective needs:
sequence sums, or TDPO's logits; nothing for the reference-free SimPO, CPO, ORPO, whose runs build no
reference at all) -> the objective's per-pair losses; its summed loss is scaled by
world_size / global_pairs so that, after DeepSpeed averages gradients over ranks, the step's gradient
is that of the mean over all pairs (docs/design.md §5). Under sequence parallelism
(train.sequence_parallel N) a group of N ranks shares each micro-batch: the forward runs on each rank's
slice, the per-token statistics are gathered, and the scale is (world_size / N) / global_pairs (§5 rule
12). The accumulation boundary is each rank's last micro-batch. Before the optimizer update one
collective agrees whether any rank saw a non-finite loss
or gradient partition (then every rank skips the update); after it, one all-reduce carries all of the
step's metrics (the gradient norm too), and whether any rank got a stop signal (runtime/stop.py: then
every rank checkpoints after that step and leaves with stop.EXIT_STOPPED). aot / aot_unpaired add one
collective before the first micro-batch (the step's sort, after a no-grad pre-pass), and reference.sync
one after the update (the moving reference); docs/design.md §5 lists them. Checkpoints every
`train.save_every` steps and at the end; resume from the latest complete one (runtime/checkpoint.py).
Each evaluation feeds the over-optimisation detectors (monitoring/detectors.py: alerts, an optional
clean stop, the best checkpoint); with loss.alpha=auto each step's (or each evaluation's) reduced
entropy feeds the alpha controller, whose alpha the next step trains at.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from hdpo_ds.common.atomic import write_text
from hdpo_ds.config import Config, ConfigError, flatten, loss_label, reference_source, to_dict
from hdpo_ds.data import (
    IndexedPairs,
    PackedBatch,
    PairSampler,
    StepAssignment,
    collate,
    pack_step,
    packing_stats,
)
from hdpo_ds.monitoring.alpha import AlphaController
from hdpo_ds.monitoring.detectors import MonitorSuite
from hdpo_ds.objectives.coupled import RewardBaseline, aot_partners, aot_sort_values
from hdpo_ds.objectives.logprobs import segment_sums, token_stats
from hdpo_ds.objectives.modifiers import ld_token_weights, wpo_weights
from hdpo_ds.objectives.objective import PairLoss, PairTerms, make_objective
from hdpo_ds.objectives.reference_free import REFERENCE_FREE_LOSS_TYPES
from hdpo_ds.objectives.router import RouterStats, router_stats
from hdpo_ds.recipes.precompute import ensure_reference_caches, load_reference_engine
from hdpo_ds.recipes.session import NonFiniteTrainingError, TrainingSession, TrainResult
from hdpo_ds.recipes.splits import (
    check_data_options,
    log_sources,
    prepare_split,
    source_params,
    split_sources,
)
from hdpo_ds.reference.sources import (
    AdaptersOffReference,
    CachedReference,
    OnlineReference,
    pair_sequence_indices,
)
from hdpo_ds.runtime import checkpoint, dist, engine, lora, perf, sequence_parallel, stop
from hdpo_ds.runtime.fused_head import (
    head_transform,
    policy_token_stats,
    policy_token_stats_kl,
    use_fused_head,
)
from hdpo_ds.runtime.models import check_model_source, load_model_config, moe_routing
from hdpo_ds.tracking.metrics import (
    SOURCE_METRICS,
    StepAccumulator,
    peak_memory_mib,
    source_metrics,
    source_sums,
)

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteTrainingError", "PreferenceRecipe", "StepOutcome", "TrainResult", "train"]


@dataclass
class _BatchResult:
    """One micro-batch's per-pair values, each (num_pairs,) in this batch's pair order."""

    loss: PairLoss
    lp: tuple[torch.Tensor, torch.Tensor]
    ref: tuple[torch.Tensor, torch.Tensor] | None  # None: a reference-free objective
    tokens: tuple[torch.Tensor, torch.Tensor]
    token_sums: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
    router: RouterStats | None = None  # a mixture-of-experts policy: this forward's router loss, counts


@dataclass
class StepOutcome:
    """What one optimizer step did: its metrics (globally reduced, identical on every rank), whether the
    update was skipped (a non-finite loss or gradient on some rank), and how many ranks got a stop signal."""

    metrics: dict[str, float]
    skipped: bool
    stop_requests: float


def check_before_engines(cfg: Config) -> None:
    """Everything that can be checked without building an engine (the keys are named in errors)."""
    if cfg.reference.rebuild_stale and cfg.reference.mode == "cached":
        raise ConfigError(
            "reference.rebuild_stale: has no effect with reference.mode=cached (training never computes "
            "the cache); use reference.mode=auto, or rebuild it with launch/precompute_ref.py "
            "reference.rebuild_stale=true"
        )
    check_model_source(cfg.model)
    lora.check_init_adapter(cfg.model.lora)
    if cfg.reference.name_or_path:
        check_model_source(
            dataclasses.replace(cfg.model, name_or_path=cfg.reference.name_or_path),
            key="reference.name_or_path",
        )
    if cfg.model.router_aux_loss_coef is not None and moe_routing(load_model_config(cfg.model)) is None:
        raise ConfigError(
            f"model.router_aux_loss_coef: {cfg.model.name_or_path} is not a mixture-of-experts model with a "
            "router loss (its config has no output_router_logits / router_aux_loss_coef); leave it null"
        )
    if cfg.model.moe_leaf_modules and moe_routing(load_model_config(cfg.model)) is None:
        raise ConfigError(
            f"model.moe_leaf_modules: true, but {cfg.model.name_or_path} is not a mixture-of-experts model; "
            "set it false"
        )
    objective = make_objective(cfg.loss, chunk_size=cfg.train.logits_chunk_size)
    sequence_parallel.check_run(
        cfg, token_kl=objective.has_kl, reference=objective.needs_reference, loss=loss_label(cfg.loss)
    )
    if cfg.train.fused_head is True:
        models = {"model.name_or_path": cfg.model}
        if cfg.reference.name_or_path and cfg.loss.type not in REFERENCE_FREE_LOSS_TYPES:
            models["reference.name_or_path"] = dataclasses.replace(
                cfg.model, name_or_path=cfg.reference.name_or_path
            )
        for key, model_cfg in models.items():
            model_type = load_model_config(model_cfg).model_type
            if head_transform(load_model_config(model_cfg)) is None:
                raise ConfigError(
                    f"train.fused_head: true: the fused head does not reproduce the logits of {key}'s "
                    f"model_type {model_type!r} (runtime/fused_head.py FUSED_HEAD_MODEL_TYPES)"
                )


class PreferenceRecipe:
    """Preference training on every rank; rank 0 alone logs to MLflow.

    State (besides the session's step, non-finite counters and last saved step): `alpha` (the H-DPO
    alpha the next step trains at: fixed, or the controller's), `last_alpha` (the one the last step
    trained at, which evaluations use), `monitors` (the detectors' history and alerts), `controller`
    (the adaptive-alpha controller, or None), `stopped_by_alert`.

        recipe = PreferenceRecipe(cfg, ds_config_path)
        recipe.setup()                       # collective: engines, data, reference, resume, logger
        outcome = recipe.train_step(recipe.next_assignment())   # one optimizer step
        recipe.run()                         # setup (if not done), the loop, finish
    """

    def __init__(self, cfg: Config, ds_config_path: str) -> None:
        self.cfg = cfg
        self.session = TrainingSession(cfg, ds_config_path, what_is_checked="loss or gradient")
        self.objective = make_objective(cfg.loss, chunk_size=cfg.train.logits_chunk_size)
        self.monitors = MonitorSuite(cfg.monitors)
        self.controller = _alpha_controller(cfg)
        # bco_pair: the running reward mean of the steps before the current one (objectives/coupled.py)
        self.reward_baseline = RewardBaseline() if self.objective.coupling == "baseline" else None
        self._prepass_s: float | None = None  # aot: the last step's pre-pass wall time
        self.stopped_by_alert = False
        self.last_alpha = self.alpha  # the alpha the last step trained at; evaluations use it
        self._epoch = iter(())
        self._ready = False
        self.moving_reference = None  # the reference engine that reference.sync updates, else None

    @property
    def step(self) -> int:
        return self.session.step

    @property
    def alpha(self) -> float:
        """Read at every step: the controller moves it after a step or an evaluation (loss.alpha_update)."""
        return self.controller.alpha if self.controller is not None else self.cfg.loss.alpha

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Collective. What can fail fast fails before any engine exists; then the data, the policy and
        reference engines (built inside zero.Init under ZeRO-3), resume, and the MLflow run."""
        cfg, s = self.cfg, self.session
        # a reference engine (or the precompute's) needs its ds_config; adapters_off online builds none
        needs_reference = self.objective.needs_reference and not (
            cfg.reference.mode == "online" and reference_source(cfg) == "adapters_off"
        )
        infer_ds_config = engine.load_ds_config(cfg.reference.ds_config) if needs_reference else None
        check_before_engines(cfg)
        s.load_tokenizer()
        check_data_options(cfg)

        s.start_distributed()
        s.resolve_dtype()
        self.sp = sequence_parallel.setup(cfg, s.device_type, s.dtype)
        self.splits = {name: prepare_split(cfg, name, s.tokenizer) for name in split_sources(cfg)}
        self.train_data = self.splits["train"].data
        self.eval_data = self.splits["eval"].data if "eval" in self.splits else None
        weights = self.splits["train"].records.entries.weights  # None: a plain list of paths
        self.sampler = PairSampler(
            self.train_data.pairs.lengths,
            pairs_per_step=cfg.train.pairs_per_step,
            world_size=self.sp.data_size,  # a sequence-parallel group shares its micro-batches
            rank=self.sp.data_rank,
            seed=cfg.train.seed,
            max_tokens_per_micro_batch=self._budget,
            max_length=cfg.data.max_length,
            packing=cfg.data.packing,
            sources=self.train_data.pairs.sources if weights is not None else None,
            weights=weights,
            multiple_of=self.sp.size,
        )
        if s.rank == 0:
            log_sources(self.splits["train"], "data.train_files", self.sampler.quotas)
        # eval/source<i>/ metrics when the held-out pairs come from several data.eval_files entries
        self.eval_num_sources = len(self.splits["eval"].records.entries.specs) if self.eval_data else 0
        self.eval_sources = self.eval_data.pairs.sources if self.eval_num_sources > 1 else None
        s.find_resume_point()
        self.ref_ds = (
            s.fill_ds_config(infer_ds_config, training=False, dtype=s.dtype) if needs_reference else None
        )
        s.build_policy()
        self.fused_head = self._use_fused_head()
        self._setup_reference()
        self.moe = self._moe_settings()
        self._setup_perf()
        self._resume()
        self._open_logger()
        modifiers = "".join(
            (
                f", weighting {cfg.loss.weighting}" if cfg.loss.weighting != "none" else "",
                f", ld_alpha {cfg.loss.ld_alpha:g}" if cfg.loss.ld_alpha is not None else "",
            )
        )
        if s.rank == 0:
            logger.info("loss: %s%s", loss_label(cfg.loss), modifiers)
        s.open_progress(loss_label(cfg.loss))
        self._ready = True

    @property
    def _budget(self) -> int:
        """Real tokens per micro-batch: data.max_tokens_per_micro_batch per rank, times the group size."""
        return self.cfg.data.max_tokens_per_micro_batch * self.sp.size

    def _collate(self, pairs, mb):
        """One micro-batch's tensors, its packed row padded to a multiple of the sequence-parallel size."""
        s = self.session
        return collate(
            pairs,
            mb,
            pad_token_id=s.tokenizer.pad_token_id,
            packing=self.cfg.data.packing,
            multiple_of=self.sp.size,
        )

    def _setup_perf(self) -> None:
        """What perf/mfu needs beyond the session's (runtime/perf.py): the FLOP counts of a reference that
        runs a forward (its own engine, or the policy's base with the adapters off; a cache runs none) and
        the timer of the step's phases."""
        s = self.session
        s.setup_perf()
        self.reference_counts = None
        if self.reference_source == "engine":
            self.reference_counts = perf.model_counts(self.references["train"].engine.module)
        elif self.reference_source == "adapters_off":
            self.reference_counts = dataclasses.replace(s.flop_counts, trained=0)
        self.timer = perf.StepTimer(s.device)

    def _setup_reference(self) -> None:
        """The reference (`reference_source`): its own engine (`engine`), the policy's engine with its LoRA
        adapters disabled (`adapters_off`: no second model), cached values and no engine at all
        (`cache`, reference.mode cached / auto), or nothing whatever for a reference-free objective
        (`none`)."""
        cfg, s = self.cfg, self.session
        self.cache_actions: dict[str, str] = {}
        if not self.objective.needs_reference:
            self.reference_source = "none"
            self.references = dict.fromkeys(self.splits, None)
            if dist.is_main_process():
                logger.info("reference: none (loss.type=%s is reference-free)", loss_label(cfg.loss))
            return
        if cfg.reference.mode == "online" and reference_source(cfg) == "adapters_off":
            self.reference_source = "adapters_off"
            policy = OnlineReference(s.policy, cfg.train.logits_chunk_size, fused_head=self.fused_head)
            self.references = dict.fromkeys(self.splits, AdaptersOffReference(policy))
            if dist.is_main_process():
                logger.info("reference: the policy's base model, its LoRA adapters disabled (no engine)")
            return
        if cfg.reference.mode == "online":
            self.reference_source = "engine"
            online = load_reference_engine(cfg, self.ref_ds, s.dtype, s.device_type)
            self.references = dict.fromkeys(self.splits, online)
            if cfg.reference.sync != "none":
                engine.paired_parameters(s.policy.module, online.engine.module)  # names, shapes: fail now
                self.moving_reference = online.engine
            if dist.is_main_process():
                logger.info("reference: online (a ZeRO-3 inference engine), sync %s", cfg.reference.sync)
            return
        self.reference_source = "cache"
        caches, self.cache_actions = ensure_reference_caches(
            cfg,
            self.splits,
            ref_ds=self.ref_ds,
            dtype=s.dtype,
            device_type=s.device_type,
            device=s.device,
            pad_token_id=s.tokenizer.pad_token_id,
            compute_missing=cfg.reference.mode == "auto",
        )
        self.references = {name: CachedReference(cache, s.device) for name, cache in caches.items()}
        if dist.is_main_process():
            logger.info("reference: cached values (reference.mode=%s)", cfg.reference.mode)

    def _use_fused_head(self) -> bool:
        """The policy's train.fused_head (runtime/fused_head.py use_fused_head). Never when the output
        layer carries a LoRA adapter or is a modules_to_save copy (the fused head reads only lm_head.weight
        and bias): `auto` turns itself off there and says so, `true` is refused. TDPO chunks both heads
        together, so there the reference's model type must be one the fused head knows too (with `true`
        an unknown one was refused at start-up)."""
        cfg = self.cfg
        setting, module = cfg.train.fused_head, self.session.policy.module
        if lora.output_layer_adapted(module):
            if setting is True:
                raise ConfigError(
                    "train.fused_head: true reads only the output layer's weight and bias, but model.lora "
                    "adapts the output layer (target_modules or modules_to_save); set train.fused_head=auto "
                    "or false"
                )
            if setting == "auto" and dist.is_main_process():
                logger.info("train.fused_head: auto: off, the output layer is adapted by model.lora")
            return False
        fused = use_fused_head(setting, module.config)
        if fused and self.objective.has_kl and cfg.reference.name_or_path:
            reference = dataclasses.replace(cfg.model, name_or_path=cfg.reference.name_or_path)
            return head_transform(load_model_config(reference)) is not None
        return fused

    def _moe_settings(self) -> tuple[int, float] | None:
        """(experts per token, the router loss's weight) of a mixture-of-experts policy, else None."""
        routing = moe_routing(self.session.policy.module.config)
        if routing is None:
            return None
        top_k, model_coef = routing
        coef = self.cfg.model.router_aux_loss_coef
        coef = model_coef if coef is None else float(coef)
        if self.session.rank == 0:
            logger.info("mixture of experts: top-%d routing, router loss weight %g", top_k, coef)
        return top_k, coef

    def _resume(self) -> None:
        state = self.session.load_checkpoint()
        if state is None:
            return
        if self.moving_reference is not None:  # the synced reference is state, saved with the policy
            checkpoint.load_reference(self.moving_reference, self.session.resume_folder)
        self.sampler.load_state_dict(state["sampler"])
        if state.get("monitors"):  # absent in checkpoints written before the monitors existed
            self.monitors.load_state_dict(state["monitors"], resume_step=self.step)
            if dist.is_main_process():  # alerts after the checkpoint are redone: drop their lines
                _write_alerts(self.cfg.output_dir, self.monitors.alerts)
        if self.controller is not None and state.get("alpha_controller"):
            self.controller.load_state_dict(state["alpha_controller"])
        if self.reward_baseline is not None and state.get("reward_baseline"):  # bco_pair's delta
            self.reward_baseline.load_state_dict(state["reward_baseline"])

    def _open_logger(self) -> None:
        cfg, s = self.cfg, self.session
        train_split, eval_data = self.splits["train"], self.eval_data
        params = {f"ds_config.{k}": v for k, v in flatten(s.policy_ds).items()}
        params.update(s.run_params())
        params.update(
            {
                "run.ds_config_path": s.ds_config_path,
                "run.train_pairs": len(self.train_data.pairs),
                "run.eval_pairs": len(eval_data.pairs) if eval_data else 0,
                "run.torch_threads": torch.get_num_threads(),
            }
        )
        for name, count in {**train_split.records.skipped, **self.train_data.stats}.items():
            params[f"data.{name}"] = count
        params.update(source_params(train_split, self.sampler.quotas))
        params["run.fused_head"] = self.fused_head  # the policy's statistics from hidden states (no logits)
        if self.reference_source in ("engine", "adapters_off"):
            # TDPO's reference head runs inside the policy's fused pass (objectives/fused_head.py)
            online = self.references["train"]
            params["run.fused_head_reference"] = (
                self.fused_head if self.objective.has_kl else online.fused_head
            )
        # engine, adapters_off, cache, or none (reference-free): outside scripts read it
        params["run.reference_source"] = self.reference_source
        if self.reference_source != "none":
            params["run.reference_mode"] = cfg.reference.mode
        params.update({f"run.reference_cache.{name}": action for name, action in self.cache_actions.items()})
        artifacts = {"ds_config.json": s.policy_ds}
        if self.ref_ds is not None:
            artifacts["ds_config_reference.json"] = self.ref_ds
        artifacts["config.json"] = to_dict(cfg)
        s.open_logger(params, artifacts)
        if dist.is_main_process() and not s.resume_state:
            logger.info(
                "attention implementation: %s (%s); MLflow run %s at %s",
                s.loaded.attn_implementation,
                s.loaded.attn_reason,
                s.run_logger.run_id,
                s.run_logger.tracking_uri,
            )

    # -------------------------------------------------------------------------------- one training step
    def next_assignment(self) -> StepAssignment:
        """The pairs and packing of the next step: the rest of this epoch, then the next one."""
        assignment = next(self._epoch, None)
        while assignment is None:
            self._epoch = iter(self.sampler)  # the next epoch, or the rest of the resumed one
            assignment = next(self._epoch, None)
        return assignment

    def train_step(self, assignment: StepAssignment) -> StepOutcome:
        """One optimizer step on this rank's micro-batches of `assignment` (collective: one non-finite
        agreement, one metrics all-reduce). Does not advance the step counter (see `after_step`)."""
        cfg, s = self.cfg, self.session
        policy, device, step, alpha = s.policy, s.device, s.step, self.alpha
        self.last_alpha = alpha
        started = time.perf_counter()
        timer = self.timer
        timer.begin()
        lr = policy.get_lr()[0]  # the rate this step's update uses (the scheduler advances in step())
        policy.train()
        acc = self._accumulator(device)
        micro_batches = assignment.micro_batches
        # DeepSpeed averages over all ranks; a group's ranks share its pairs, and the gather's backward
        # sums the group's identical losses: so each pair counts once (docs/design.md §5)
        scale = self.sp.data_size / assignment.num_pairs
        real_tokens, model_flops = 0, 0.0
        if self.moe is not None:  # the router loss of a micro-batch weighs by its share of the step's tokens
            step_tokens = sum(mb.tokens for rank in assignment.packed.ranks for mb in rank if not mb.filler)
            moe_counts, moe_aux = None, 0.0
        with timer.phase("forward"):
            coupled = self._coupling(
                self.references["train"], assignment.pairs(self.train_data.pairs), assignment
            )
        bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss or gradient here
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with timer.phase("data"):
                host = self._collate(assignment.pairs(self.train_data.pairs), mb)
                batch = host.to(device)
            policy.set_gradient_accumulation_boundary(last)
            planted = s.faults.plant_nan_gradient(step, i, policy)
            with timer.phase("forward"):
                out = self._run_batch(
                    self.references["train"], batch, track_grad=True, alpha=alpha, **coupled[i]
                )
            out.loss.losses = s.faults.plant_nan(step, i, out.loss.losses)
            losses = out.loss.losses
            finite = torch.isfinite(losses).all()
            # A filler runs a real forward and backward (ZeRO-3 needs every rank in it) but weighs 0;
            # a non-finite loss backs off to 0 here and the step is then skipped on all ranks.
            loss = losses.sum() * (scale * batch.weight)
            if out.router is not None:
                share = batch.num_real_tokens / step_tokens
                finite = finite & torch.isfinite(out.router.aux)
                loss = loss + self.moe[1] * out.router.aux * (share * s.world_size * batch.weight)
                counts = out.router.counts * (0.0 if mb.filler else 1.0)  # every rank: the same shape
                moe_counts = counts if moe_counts is None else moe_counts + counts
                if not mb.filler:
                    moe_aux = moe_aux + out.router.aux.detach() * share
            bad |= ~finite
            loss = torch.where(finite, loss, torch.zeros((), device=device, dtype=loss.dtype))
            with timer.phase("backward"):
                policy.backward(loss)
            if planted is not None:
                planted.remove()
            with timer.phase("optimizer"):
                if not last:
                    policy.step()
                else:
                    skip_step = self._update(bad)
            if not mb.filler and self.sp.reports:  # a group's pairs count once
                _accumulate(acc, out)
                real_tokens += batch.num_real_tokens
                model_flops += perf.micro_batch_flops(
                    s.flop_counts,
                    batch.num_real_tokens,
                    host.sum_squared_lengths(),
                    reference=self.reference_counts,
                    policy_forwards=1 if self.objective.coupling == "sort" else 0,
                )
        acc.add("real_tokens", real_tokens)
        acc.add("stop_requests", 1.0 if stop.received() else 0.0)  # rides in the metrics collective below
        # The same on every rank: summed over ranks here (no host sync of its own), divided back below.
        norm = float("nan") if skip_step else _grad_norm(policy)
        # The step's second collective (the first was the skip agreement) and second host sync.
        router_sums = {}
        if self.moe is not None:  # the step's router loss and (layer, expert) counts: the same collective
            router_sums = {"moe/aux_loss": moe_aux}
            layers, experts = moe_counts.shape
            router_sums.update(
                {f"moe_count/{i}/{e}": moe_counts[i, e] for i in range(layers) for e in range(experts)}
            )
        sums = dist.reduce_sums(
            {**acc.sums, "grad_norm": norm, "model_flops": model_flops, **router_sums}, device=device
        )
        elapsed = time.perf_counter() - started
        phases = timer.read()  # after the reduction's host sync: the CUDA events are done
        metrics = acc.metrics(sums)
        if self.moe is not None:
            metrics.update(_router_metrics(sums, moe_counts.shape, self.moe[1]))
            metrics["loss"] += self.moe[1] * metrics["moe/aux_loss"]  # what the backward minimised
        stats = packing_stats(assignment.packed)
        s.count_update(skip_step)
        if self.moving_reference is not None:
            metrics["reference/syncs"] = self._sync_reference(skip_step)
        metrics.update(
            {
                "nonfinite/skipped_steps": s.nonfinite["skipped_total"],
                "alpha": alpha,
                "grad_norm": sums["grad_norm"] / s.world_size,
                "lr": lr,
                "tokens_per_second": sums["real_tokens"] / elapsed,
                "padding_fraction": stats.padding_fraction,
                "packing_fill": stats.fill,
                "tokens": sums["real_tokens"],
                "step_time_s": elapsed,
                **perf.step_metrics(
                    sums["model_flops"], sums["real_tokens"], elapsed, s.world_size, s.peak_tflops, phases
                ),
            }
        )
        metrics.update(self._coupling_metrics(sums, skip_step))
        if self.controller is not None and cfg.loss.alpha_update == "step":
            # identical inputs on every rank (globally reduced), so every rank computes the same next alpha
            self.controller.update(metrics["entropy/chosen"])
            metrics.update(_controller_metrics(self.controller, cfg))
        return StepOutcome(metrics, skip_step, sums["stop_requests"])

    def _update(self, bad: torch.Tensor) -> bool:
        """At the accumulation boundary: agree on a skip (one collective), then update or discard.
        A finite loss can still give a NaN/Inf gradient (bf16 overflow inside the graph): this rank's
        reduced gradient partition is checked too, in the same agreement."""
        s = self.session
        bad = bad | ~engine.local_all_finite(s.policy, "grad", s.device)
        skip_step = dist.all_agree(bad, device=s.device)  # one collective decides for all ranks
        if skip_step:
            engine.discard_gradients(s.policy)  # no update: optimizer, scheduler, step counters stay put
            return True
        if s.step in self.cfg.train.dump_gradients_at:
            _dump_gradients(s.policy, self.cfg.output_dir, s.step)
        s.policy.step()
        return False

    # ---------------------------------------------- losses coupled across the step (bco_pair, aot; §4)
    def _coupling(self, reference, pairs, packing) -> list[dict]:
        """Per micro-batch of `packing` (this rank's), the keyword arguments of `_run_batch` that couple
        the step's pairs: bco_pair's baseline (the steps before this one), or AOT's sorted partners from
        a no-grad pre-pass over the whole step on all ranks (`_sort_partners`); nothing otherwise."""
        micro_batches = packing.micro_batches
        self._prepass_s = None
        if self.objective.coupling == "baseline":
            return [{"baseline": self.reward_baseline.value}] * len(micro_batches)
        if self.objective.coupling == "sort":
            started = time.perf_counter()
            coupled = self._sort_partners(reference, pairs, micro_batches, packing.num_pairs)
            self._prepass_s = time.perf_counter() - started
            return coupled
        return [{}] * len(micro_batches)

    @torch.no_grad()
    def _sort_partners(self, reference, pairs, micro_batches, num_pairs: int) -> list[dict]:
        """AOT's pre-pass: forward every micro-batch without a graph (the same number on every rank:
        ZeRO-3 gathers parameters collectively), gather the values AOT sorts from all ranks by step
        position (`dist.gather_rows`, one collective), sort, and hand each micro-batch its pairs'
        partners. The reference values are kept for the gradient pass, which reads them again."""
        device = self.session.device
        rows, positions, kept = [], [], []
        for mb in micro_batches:
            batch = self._collate(pairs, mb).to(device)
            ref_values = self._reference_values(reference, batch)
            zeros = torch.zeros((len(mb.pairs), 2), device=device)  # a placeholder pairing: loss unused
            out = self._run_batch(
                None, batch, track_grad=False, alpha=1.0, partners=zeros, ref_values=ref_values
            )
            kept.append(ref_values)
            # a filler repeats a real pair: it must not enter the sort twice; nor a group's other ranks' rows
            if not mb.filler and self.sp.reports:
                unpaired = self.objective.coupled_type == "aot_unpaired"
                rows.append(aot_sort_values(*out.lp, *out.ref, unpaired=unpaired))
                positions.append(torch.as_tensor(mb.pairs, dtype=torch.long, device=device))
        mine = torch.cat(rows) if rows else torch.zeros((0, 2), device=device)
        where = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long, device=device)
        partners = aot_partners(dist.gather_rows(mine, where, num_pairs))
        return [
            {
                "partners": torch.zeros((len(mb.pairs), 2), device=device)  # weight 0: any finite value
                if mb.filler
                else partners[torch.as_tensor(mb.pairs, dtype=torch.long, device=device)],
                "ref_values": ref_values,
            }
            for mb, ref_values in zip(micro_batches, kept, strict=True)
        ]

    def _coupling_metrics(self, sums: dict[str, float], skipped: bool) -> dict[str, float]:
        """bco/baseline (the delta this step trained against; then the step's rewards join the running
        mean, unless the update was skipped), aot/prepass_s (the pre-pass's wall time on this rank)."""
        if self.reward_baseline is not None:
            used = self.reward_baseline.value
            if not skipped:  # the reduced sums: the same on every rank, no collective of its own
                self.reward_baseline.update(
                    sums["rewards/chosen"] + sums["rewards/rejected"], 2 * sums["pairs"]
                )
            return {"bco/baseline": used}
        if self._prepass_s is not None:
            return {"aot/prepass_s": self._prepass_s}
        return {}

    # ------------------------------------------------------------------- the moving reference (TR-DPO)
    def _sync_reference(self, skipped: bool) -> int:
        """reference.sync (TR-DPO, docs/design.md §4): after the update that makes the count of applied
        updates (steps so far, this one included, less the skipped ones: identical on every rank) a
        multiple of reference.sync_every, move the reference (a collective). Returns the syncs so far."""
        ref, s = self.cfg.reference, self.session
        applied = s.step + 1 - s.nonfinite["skipped_total"]
        if not skipped and applied % ref.sync_every == 0:
            engine.sync_reference(
                s.policy, self.moving_reference, 1.0 if ref.sync == "hard" else ref.sync_alpha
            )
        return applied // ref.sync_every

    # -------------------------------------------------------------------------------------------------
    def _accumulator(self, device) -> StepAccumulator:
        extra = ("wpo/weight",) if self.cfg.loss.weighting == "wpo" else ()
        return StepAccumulator(
            device,
            with_kl=self.objective.has_kl,
            with_reference=self.objective.needs_reference,
            pair_means=(*self.objective.pair_metrics, *extra),
        )

    def _ld_weights(self, batch: PackedBatch) -> torch.Tensor | None:
        """LD-DPO's per-token weights of this micro-batch (loss.ld_alpha), or None when it is off."""
        if self.cfg.loss.ld_alpha is None:
            return None
        return ld_token_weights(
            batch.labels, batch.seq_index, batch.pair_index, batch.num_pairs, self.cfg.loss.ld_alpha
        )

    def _reference_values(self, reference, batch: PackedBatch):
        with self.timer.phase("reference"):
            return self.objective.reference_values(reference, batch, self._ld_weights(batch))

    def _run_batch(
        self,
        reference,
        batch: PackedBatch,
        *,
        track_grad: bool,
        alpha: float,
        baseline: float | None = None,
        partners: torch.Tensor | None = None,
        ref_values: tuple | None = None,
    ) -> _BatchResult:
        """Forward the policy on one micro-batch, get the reference's values the objective needs (engine
        or cache; none for a reference-free objective; `ref_values` when a pre-pass already read them),
        and compute the per-pair losses at this step's `alpha` (with the step's coupling constants,
        `baseline` or `partners`, for the objectives coupled across the step)."""
        cfg, objective = self.cfg, self.objective
        # the forward sees this rank's slice of the row (sequence parallelism); everything after the
        # gathered per-token statistics sees the whole row
        local = self.sp.shard(batch)
        inputs = local.model_inputs()
        mask = batch.labels != -100
        num_seqs = batch.num_seqs
        ld_weights = self._ld_weights(batch)
        # TDPO through the fused head reads the reference's hidden states instead of its logits, below
        fused_kl = self.fused_head and objective.has_kl
        if ref_values is None and objective.needs_reference and not fused_kl:
            with self.timer.phase("reference"):
                ref_values = objective.reference_values(reference, batch, ld_weights)
        ref_seq, ref_logits = ref_values if ref_values is not None else (None, None)
        policy = self.session.policy
        call, routed = policy, []
        if self.moe is not None:  # the router logits come back with the forward's outputs

            def call(**kwargs):
                out = policy(**kwargs, output_router_logits=True)
                routed.append(out.router_logits)
                return out

        with torch.set_grad_enabled(track_grad):
            collision = cfg.loss.weighting == "wpo"
            if fused_kl:  # both heads in the same token chunks: no logits of either model
                logits = None
                fused = policy_token_stats_kl(
                    call,
                    policy.module,
                    inputs,
                    batch.labels,
                    reference.head_inputs(batch),
                    top_k=cfg.train.top_k,
                    chunk_size=cfg.train.logits_chunk_size,
                    collision=collision,
                )
                stats = fused.stats
                ref_seq = segment_sums(
                    fused.reference_logps, batch.seq_index, num_seqs, mask=mask, dtype=torch.float32
                ).sums
            elif self.fused_head:  # never the full logits (runtime/fused_head.py)
                logits = None
                stats = policy_token_stats(
                    call,
                    policy.module,
                    inputs,
                    local.labels,
                    top_k=cfg.train.top_k,
                    chunk_size=cfg.train.logits_chunk_size,
                    collision=collision,
                )
            else:
                logits = call(**inputs).logits
                stats = token_stats(
                    logits,
                    local.labels,
                    top_k=cfg.train.top_k,
                    chunk_size=cfg.train.logits_chunk_size,
                    collision=collision,
                )
            stats = self.sp.gather_stats(stats)
            plain = segment_sums(stats.logps, batch.seq_index, num_seqs, mask=mask, dtype=torch.float32)
            seq = plain
            if ld_weights is not None:  # LD-DPO: the loss sees the desensitised sums, the NLL the plain
                seq = segment_sums(
                    stats.logps * ld_weights, batch.seq_index, num_seqs, mask=mask, dtype=torch.float32
                )
            if fused_kl:
                seq_kl = segment_sums(
                    fused.kl, batch.seq_index, num_seqs, mask=mask, dtype=torch.float32
                ).sums
            else:
                seq_kl = objective.sequence_kl(
                    logits, ref_logits, batch.labels, batch.seq_index, num_seqs, mask
                )
            # every real token of the forward counts, prompts included, as in the model's own training
            router = router_stats(routed[0], self.moe[0], batch.seq_index >= 0) if routed else None
            del ref_logits
        monitor_sums = {
            name: segment_sums(
                getattr(stats, name), batch.seq_index, num_seqs, mask=mask, dtype=torch.float32
            ).sums
            for name in ("entropy", "topk_mass", "topk_entropy")
        }
        chosen, rejected = pair_sequence_indices(batch)
        ref = None if ref_seq is None else (ref_seq[chosen], ref_seq[rejected])
        terms = PairTerms(
            seq.sums[chosen],
            seq.sums[rejected],
            None if ref is None else ref[0],
            None if ref is None else ref[1],
            chosen_tokens=seq.counts[chosen],
            rejected_tokens=seq.counts[rejected],
            kl_chosen=None if seq_kl is None else seq_kl[chosen],
            kl_rejected=None if seq_kl is None else seq_kl[rejected],
            reward_baseline=baseline,
            partners=partners,
            nll_chosen=None if ld_weights is None else plain.sums[chosen],
        )
        loss = objective.pair_loss(terms, alpha)
        if cfg.loss.weighting == "wpo":
            loss = _wpo_weighted(loss, stats, batch, mask, chosen, rejected, seq.counts)
        return _BatchResult(
            loss=loss,
            lp=(seq.sums[chosen].detach(), seq.sums[rejected].detach()),
            ref=ref,
            tokens=(seq.counts[chosen], seq.counts[rejected]),
            token_sums=(
                {k: v[chosen] for k, v in monitor_sums.items()},
                {k: v[rejected] for k, v in monitor_sums.items()},
            ),
            router=router,
        )

    def after_step(self, outcome: StepOutcome) -> bool:
        """The bookkeeping after a step: the train history, logging, the step counter, the non-finite
        limit, an evaluation when due, a checkpoint when due or asked for. True: an alert stops the run."""
        s, metrics = self.session, outcome.metrics
        self.monitors.record_train(s.step, metrics)
        postfix = {
            "loss": f"{metrics['loss']:.4f}",
            "margin": f"{metrics['rewards/margins']:.3f}",
            "acc": f"{metrics['rewards/accuracies']:.2f}",
            "tok_s": f"{metrics['tokens_per_second']:.0f}",
            "mfu": f"{metrics['perf/mfu']:.1%}",
        }
        s.log_step(metrics, postfix)
        s.stop_if_nonfinite(self.save)
        if s.evaluation_due(self.eval_data is not None) and self.evaluate_and_watch():
            self.stopped_by_alert = True  # monitors.on_alert=stop: end cleanly here (see finish)
            return True
        s.save_or_stop(outcome.stop_requests, self.save)
        return False

    # ---------------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics on the held-out pairs, under `eval/`. Every rank runs the same number of forwards."""
        cfg, s = self.cfg, self.session
        s.policy.eval()
        eval_data = self.eval_data
        lengths = eval_data.pairs.lengths
        count = len(lengths) if not cfg.train.eval_pairs else min(cfg.train.eval_pairs, len(lengths))
        positions = np.arange(count)
        acc = self._accumulator(s.device)
        num_sources = self.eval_num_sources if self.eval_sources is not None else 0
        # every rank reduces the same keys, also a rank whose micro-batches are all fillers
        per_source = {f"source{i}/{n}": 0.0 for i in range(num_sources) for n in SOURCE_METRICS}
        # Chunks of pairs_per_step pairs keep each packing (and its fillers) to the training step's size.
        for start in range(0, count, cfg.train.pairs_per_step):
            chunk = positions[start : start + cfg.train.pairs_per_step]
            packed = pack_step(
                lengths[chunk],
                world_size=self.sp.data_size,
                max_tokens_per_micro_batch=self._budget,
                packing=cfg.data.packing,
                multiple_of=self.sp.size,
            )
            view = IndexedPairs(eval_data.pairs, chunk)  # this rank reads only its own micro-batches' pairs
            micro_batches = packed.for_rank(self.sp.data_rank)
            coupled = self._eval_coupling(view, micro_batches, len(chunk))
            for i, mb in enumerate(micro_batches):
                batch = self._collate(view, mb).to(s.device)
                out = self._run_batch(
                    self.references["eval"], batch, track_grad=False, alpha=self.last_alpha, **coupled[i]
                )
                if not mb.filler and self.sp.reports:
                    _accumulate(acc, out)
                    if num_sources:
                        sources = torch.as_tensor(self.eval_sources[chunk[list(mb.pairs)]])
                        loss = out.loss
                        sums = source_sums(
                            loss.losses, loss.chosen_rewards, loss.rejected_rewards, sources, num_sources
                        )
                        per_source = {k: per_source[k] + v for k, v in sums.items()}
        s.policy.train()
        sums = dist.reduce_sums({**acc.sums, **per_source}, device=s.device)
        return {
            **acc.metrics(sums, prefix="eval/"),
            **source_metrics(sums, num_sources, prefix="eval/"),
        }

    def _eval_coupling(self, view, micro_batches, num_pairs: int) -> list[dict]:
        """Evaluation's coupling: bco_pair's current baseline; for AOT the sort within each evaluation
        chunk (a pre-pass over the chunk, as a training step has)."""
        if self.objective.coupling == "baseline":
            return [{"baseline": self.reward_baseline.value}] * len(micro_batches)
        if self.objective.coupling == "sort":
            return self._sort_partners(self.references["eval"], view, micro_batches, num_pairs)
        return [{}] * len(micro_batches)

    def evaluate_and_watch(self) -> bool:
        """Evaluate, feed the detectors (and the controller, with alpha_update=eval); True: stop here."""
        cfg, s = self.cfg, self.session
        metrics = self.evaluate()
        if self.controller is not None and cfg.loss.alpha_update == "eval":
            # `alpha` reads the controller at each step start: the next step trains at the new value
            self.controller.update(metrics["eval/entropy/chosen"])
            metrics.update(_controller_metrics(self.controller, cfg))
        s.run_logger.log_metrics(metrics, step=s.step)
        alerts = self.monitors.observe(s.step, metrics)
        if alerts and dist.is_main_process():
            _report_alerts(alerts, cfg.output_dir, s.run_logger, s.progress)
        return bool(alerts) and cfg.monitors.on_alert == "stop"

    # -------------------------------------------------------------------------------------------- save
    def save(self) -> None:
        """A checkpoint of this step; the best evaluated checkpoint (this one included) is kept when
        older ones are pruned, and named in checkpoints/best.json."""
        cfg, s = self.cfg, self.session
        extra = {
            "sampler": self.sampler.state_dict(),
            "monitors": self.monitors.state_dict(),
            "alpha_controller": self.controller.state_dict() if self.controller else None,
        }
        if self.reward_baseline is not None:  # bco_pair's running reward mean (restored in _resume)
            extra["reward_baseline"] = self.reward_baseline.state_dict()
        best = self.monitors.best(
            cfg.monitors.best_metric,
            cfg.monitors.best_mode,
            candidates={*checkpoint.complete_steps(cfg.output_dir), s.step},
        )
        s.save(
            extra,
            protected={checkpoint.tag_for(best[0])} if best else set(),
            reference_engine=self.moving_reference,
        )
        if best and dist.is_main_process():
            checkpoint.mark_best(cfg.output_dir, best[0], cfg.monitors.best_metric, best[1])

    # ------------------------------------------------------------------------------------------ finish
    def run(self) -> TrainResult:
        """Setup (unless done), the loop to train.max_steps (or an alert's stop), and finish."""
        if not self._ready:
            self.setup()
        while self.step < self.cfg.train.max_steps:
            self.session.faults.maybe_kill(self.step)
            if self.after_step(self.train_step(self.next_assignment())):
                break
        return self.finish()

    def finish(self) -> TrainResult:
        """The final evaluation, checkpoint and export (none of them again for a run resumed from its own
        final checkpoint: they exist already), the alert summary, plots, peak memory and run_info.json."""
        cfg, s = self.cfg, self.session
        if s.finished_before:
            logger.info(
                "the checkpoint is already at train.max_steps=%d: nothing to train", cfg.train.max_steps
            )
        elif self.eval_data is not None and not self.stopped_by_alert:  # an alert stop came after one
            self.evaluate_and_watch()
        s.close_progress()
        if not s.finished_before:
            s.save_final_and_export(self.save)
        if self.stopped_by_alert:
            best = checkpoint.read_best(cfg.output_dir)
            logger.warning(
                "monitors.on_alert=stop: stopped at step %d after %s; best checkpoint by %s: %s",
                s.step,
                ", ".join(self.monitors.fired),
                cfg.monitors.best_metric,
                best,
            )
            s.run_logger.set_tags(
                {
                    "hdpo_ds.stopped_by_alert": ",".join(self.monitors.fired),
                    "hdpo_ds.best_checkpoint": (best or {}).get("tag", ""),
                }
            )
        if dist.is_main_process() and cfg.monitors.plots and not s.finished_before:
            _log_plots(self.monitors, cfg, s.run_logger)
        memory = dist.gather_objects(peak_memory_mib())
        for key in memory[0]:
            s.run_logger.log_metrics(
                {f"memory/{key}_max_over_ranks": max(m[key] for m in memory)}, step=s.step
            )
        result = s.result()
        s.run_logger.finish("FINISHED")
        s.write_run_info(
            {
                "run_id": result.run_id,
                "tracking_uri": result.tracking_uri,
                "steps": s.step,
                "experiment": cfg.logging.experiment,
                "world_size": s.world_size,
                "attn_implementation": s.loaded.attn_implementation,
                "final_loss": result.losses[-1] if result.losses else None,
                "alerts": [a.to_json() for a in self.monitors.alerts],
                "stopped_by_alert": self.stopped_by_alert,
                "best_checkpoint": checkpoint.read_best(cfg.output_dir),
                "final_alpha": self.alpha,
            }
        )
        dist.barrier()
        return result


def train(cfg: Config, ds_config_path: str) -> TrainResult:
    """Run the whole recipe. Every rank calls it; rank 0 alone logs to MLflow."""
    return PreferenceRecipe(cfg, ds_config_path).run()


def _router_metrics(sums: dict[str, float], shape, coef: float) -> dict[str, float]:
    """moe/aux_loss (the step's router loss: each micro-batch's weighted by its share of the step's
    tokens), moe/aux_weight, and the experts' load per MoE layer: the largest expert's share of the
    layer's top-k assignments over the mean share (1 = balanced; E = one expert takes every token)."""
    layers, experts = shape
    out = {"moe/aux_loss": sums["moe/aux_loss"], "moe/aux_weight": coef}
    worst = 0.0
    for i in range(layers):
        counts = [sums[f"moe_count/{i}/{e}"] for e in range(experts)]
        total = sum(counts)
        ratio = max(counts) * experts / total if total > 0 else float("nan")
        out[f"moe/load_max_over_mean/layer{i}"] = ratio
        worst = max(worst, ratio) if ratio == ratio else worst
    out["moe/load_max_over_mean"] = worst
    return out


def _accumulate(acc: StepAccumulator, result: _BatchResult) -> None:
    loss = result.loss
    acc.add_pairs(
        losses=loss.losses.detach(),
        chosen_rewards=loss.chosen_rewards,
        rejected_rewards=loss.rejected_rewards,
        chosen_logps=result.lp[0],
        rejected_logps=result.lp[1],
        chosen_ref_logps=None if result.ref is None else result.ref[0],
        rejected_ref_logps=None if result.ref is None else result.ref[1],
        chosen_tokens=result.tokens[0],
        rejected_tokens=result.tokens[1],
        chosen_token_sums=result.token_sums[0],
        rejected_token_sums=result.token_sums[1],
    )
    if loss.kl is not None:
        acc.add("kl/chosen", loss.kl[0].sum())
        acc.add("kl/rejected", loss.kl[1].sum())
    for name, values in (loss.extras or {}).items():
        acc.add(name, values.sum())


def _wpo_weighted(loss: PairLoss, stats, batch: PackedBatch, mask, chosen, rejected, counts) -> PairLoss:
    """WPO (objectives/modifiers.py): each pair's loss times the policy's weight of the pair, from the
    response tokens' log p_t - log sum_v p_v^2 (this forward's token statistics, no gradient)."""
    adjusted = segment_sums(
        (stats.logps - stats.log_sum_p2).detach(),
        batch.seq_index,
        batch.num_seqs,
        mask=mask,
        dtype=torch.float32,
    ).sums
    weights = wpo_weights(adjusted[chosen], adjusted[rejected], counts[chosen], counts[rejected])
    extras = {**(loss.extras or {}), "wpo/weight": weights}
    return dataclasses.replace(loss, losses=loss.losses * weights.to(loss.losses.dtype), extras=extras)


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
