"""What every training recipe shares (docs/design.md §6): the run's distributed start, the policy engine,
resume, the MLflow logger and progress bar, checkpoints, the non-finite guard, stop signals, fault
injection and the end of the run. Preference training and SFT each hold one `TrainingSession` and add
their own data, loss and evaluation; they compose it rather than inherit from it.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field

import torch

from hdpo_ds.common.atomic import write_json
from hdpo_ds.common.versions import package_versions
from hdpo_ds.config import Config, ConfigError, flatten, lora_enabled, to_dict
from hdpo_ds.runtime import checkpoint, dist, engine, export, lora, perf, stop
from hdpo_ds.runtime.models import LoadedModel, load_model, load_model_config, load_tokenizer
from hdpo_ds.tracking.mlflow_logger import MlflowLogger, NullLogger

logger = logging.getLogger(__name__)

__all__ = [
    "Faults",
    "NonFiniteTrainingError",
    "TrainResult",
    "TrainingSession",
    "lr_multiplier",
    "resume_point",
]


@dataclass
class TrainResult:
    run_id: str | None
    tracking_uri: str | None
    output_dir: str
    steps: int
    losses: list[float] = field(default_factory=list)


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive non-finite steps (a good checkpoint was written before stopping), or weights
    that are not finite (then no checkpoint is written)."""


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
    differences = checkpoint.math_differences(
        flatten(state["config"]), flatten(to_dict(cfg)), defaults=flatten(to_dict(Config()))
    )
    if differences and not cfg.train.resume_force:
        raise ConfigError(
            f"train.resume: {folder} was trained with a different configuration, and resuming would "
            "change the math (set train.resume_force=true to resume anyway):\n  " + "\n  ".join(differences)
        )
    if differences:
        logger.warning("train.resume_force: resuming %s despite: %s", folder, "; ".join(differences))
    if state["world_size"] != world_size:
        raise checkpoint.CheckpointError(
            f"train.resume: {folder} was written by {state['world_size']} ranks and this run has "
            f"{world_size}; ZeRO-3 shards do not reload across world sizes (convert it with DeepSpeed's "
            "universal checkpoint tools, or resume with the same world size)"
        )
    return folder, state


class Faults:
    """Documented fault injection for tests (docs/checkpoints.md), read from the environment:
    HDPO_FAULT_KILL_AT_STEP=s: rank 0 SIGKILLs its process group (launcher and ranks) as step s starts;
    HDPO_FAULT_NAN_LOSS_AT_STEPS=a,b: rank 0 adds NaN to its first micro-batch's losses at those steps;
    HDPO_FAULT_NAN_GRAD_AT_STEPS=a,b: rank 0 makes one entry of the gradient flowing into its first
    micro-batch's logits NaN at those steps (inside the graph: the loss stays finite)."""

    def __init__(self, kill_at: int | None, nan_at: set[int], nan_grad_at: set[int] = frozenset()) -> None:
        self.kill_at, self.nan_at, self.nan_grad_at = kill_at, nan_at, nan_grad_at

    @classmethod
    def from_env(cls) -> Faults:
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


class TrainingSession:
    """One training run's shared state and plumbing, on every rank.

    State: `step` (the next optimizer step), the non-finite counters (`nonfinite`: skipped_total,
    consecutive), `last_saved` (the step of the newest checkpoint this process wrote), `losses` (one per
    step trained here). `what_is_checked` names what the non-finite guard looks at, for its messages."""

    def __init__(self, cfg: Config, ds_config_path: str, *, what_is_checked: str) -> None:
        self.cfg, self.ds_config_path = cfg, ds_config_path
        self.what_is_checked = what_is_checked
        self.ds_config = engine.load_ds_config(ds_config_path)
        self.step = 0
        self.nonfinite = {"skipped_total": 0, "consecutive": 0}
        self.last_saved: int | None = None
        self.losses: list[float] = []
        self.faults = Faults.from_env()
        self.run_logger = NullLogger()
        self.progress = None
        self.resume_folder: str | None = None
        self.resume_state: dict | None = None

    # ---- setup
    def load_tokenizer(self) -> None:
        self.tokenizer = load_tokenizer(self.cfg.model)

    def start_distributed(self) -> None:
        """Collective from here on: the process group, this rank's device, the output directory."""
        engine.init_distributed(self.cfg.train.dist_timeout_minutes)
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.device_type = engine.device_type()
        self.device = engine.current_device()
        if dist.is_main_process():
            os.makedirs(self.cfg.output_dir, exist_ok=True)

    def find_resume_point(self) -> None:
        self.resume_folder, self.resume_state = resume_point(self.cfg, self.world_size)

    def fill_ds_config(self, ds_config: dict, **kwargs) -> dict:
        return engine.fill_ds_config(
            ds_config,
            self.cfg,
            world_size=self.world_size,
            device_type=self.device_type,
            hidden_size=self.hidden_size,
            **kwargs,
        )

    def resolve_dtype(self) -> None:
        self.dtype = engine.resolve_dtype(self.cfg, self.ds_config)
        self.hidden_size = getattr(load_model_config(self.cfg.model), "hidden_size", None)
        self.policy_ds = self.fill_ds_config(self.ds_config)

    def build_policy(self) -> None:
        """The policy model, built inside zero.Init under ZeRO-3 (never whole on one rank), with LoRA
        adapters on its frozen base when model.lora.r > 0 (runtime/lora.py), and its engine with our
        learning-rate schedule (only trainable parameters reach the optimizer)."""
        cfg = self.cfg
        zero3_handle = engine.zero3_loading(self.policy_ds)
        self.loaded: LoadedModel = load_model(
            cfg.model,
            dtype=self.dtype,
            device_type=self.device_type,
            seed=cfg.train.seed,
            packing=cfg.data.packing,
        )
        del zero3_handle
        if lora_enabled(cfg):
            self.loaded.model = lora.wrap_model(self.loaded.model, cfg.model.lora, seed=cfg.train.seed)
        schedule = dict(
            warmup_steps=cfg.optim.warmup_steps,
            max_steps=cfg.train.max_steps,
            schedule=cfg.optim.schedule,
            min_lr_ratio=cfg.optim.min_lr_ratio,
        )
        self.moe_leaves = engine.mark_moe_leaves(
            self.loaded.model, self.policy_ds, cfg.model.moe_leaf_modules
        )
        if self.moe_leaves and dist.is_main_process():
            logger.info("ZeRO-3 leaf modules (gathered whole): %s", ", ".join(self.moe_leaves))
        self.policy = engine.build_policy_engine(
            self.loaded.model, self.policy_ds, lambda s: lr_multiplier(s, **schedule)
        )

    def load_checkpoint(self) -> dict | None:
        """Resume the engine, the step and the non-finite counters; returns the client state (or None)."""
        if not self.resume_folder:
            return None
        cfg, state = self.cfg, self.resume_state
        checkpoint.load(self.policy, self.resume_folder)
        # optim.* as configured (not as the optimizer state restored them); a change needs resume_force
        engine.apply_optimizer_settings(
            self.policy, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay
        )
        self.step = state["step"]
        self.nonfinite = state.get("nonfinite", self.nonfinite)
        logger.info("resumed from %s at step %d", self.resume_folder, self.step)
        return state

    def open_logger(self, params: dict, artifacts: dict[str, dict]) -> None:
        """Rank 0: a new MLflow run with the config, versions, `params` and JSON `artifacts`, or the
        resumed run reopened at this step (its params are already there)."""
        if not dist.is_main_process():
            return
        cfg = self.cfg
        if self.resume_state:
            self.run_logger = MlflowLogger.for_run(cfg, run_id=self.resume_state["mlflow_run_id"])
            self.run_logger.reopen(self.step)
            return
        self.run_logger = MlflowLogger.for_run(cfg)
        logged = {f"config.{k}": v for k, v in flatten(to_dict(cfg)).items()}
        logged.update({f"versions.{k}": v for k, v in package_versions().items()})
        logged.update(params)
        self.run_logger.log_params(logged)
        for name, data in artifacts.items():
            self.run_logger.log_json_artifact(name, data)

    def setup_perf(self) -> None:
        """After build_policy: the policy's FLOP counts and a device's peak, for perf/* (runtime/perf.py)."""
        self.flop_counts = perf.model_counts(self.policy.module)
        self.peak_tflops, self.peak_source = perf.device_peak_tflops(
            self.device, self.dtype, self.cfg.train.peak_tflops
        )

    def run_params(self) -> dict:
        """The run.* params every recipe logs."""
        return {
            "run.peak_tflops": self.peak_tflops,
            "run.peak_tflops_source": self.peak_source,
            "run.flop_params": self.flop_counts.params,
            "run.world_size": self.world_size,
            "run.device": self.device_type,
            "run.dtype": self.dtype_name,
            "run.attn_implementation": self.loaded.attn_implementation,
            "run.attn_reason": self.loaded.attn_reason,
            "run.moe_leaf_modules": ",".join(self.moe_leaves) or "none",
        }

    def open_progress(self, desc: str) -> None:
        if dist.is_main_process() and self.cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=self.cfg.train.max_steps, initial=self.step, desc=desc)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def finished_before(self) -> bool:
        """Resumed from the run's own final checkpoint: nothing is left to train."""
        return self.resume_state is not None and self.resume_state["step"] >= self.cfg.train.max_steps

    # ---- during training
    def save(self, extra_state: dict, protected: set[str] = frozenset(), reference_engine=None) -> None:
        """A checkpoint of this step: weights checked finite on every rank first, then the engine's files
        and the client state (the session's counters plus the recipe's `extra_state`); a moving
        reference's weights (`reference_engine`, reference.sync) inside too."""
        self.refuse_nonfinite_weights()
        state = {
            "step": self.step,
            # Every rank needs the same client state; only rank 0 knows the MLflow run id.
            "mlflow_run_id": dist.broadcast_object(self.run_logger.run_id),
            "config": to_dict(self.cfg),
            "world_size": self.world_size,
            "dtype": self.dtype_name,
            "nonfinite": dict(self.nonfinite),
            **extra_state,
        }
        checkpoint.save(
            self.policy,
            self.cfg.output_dir,
            self.step,
            state,
            keep=self.cfg.train.keep_checkpoints,
            tokenizer=self.tokenizer,
            protected=set(protected),
            reference_engine=reference_engine,
        )
        self.last_saved = self.step

    def refuse_nonfinite_weights(self) -> None:
        """Before any checkpoint: every rank checks its weight partition and all agree, so a checkpoint
        never holds non-finite weights and no rank is left waiting in the save's collectives."""
        if dist.all_agree(~engine.local_all_finite(self.policy, "weight", self.device), device=self.device):
            self.run_logger.finish("FAILED")
            raise NonFiniteTrainingError(
                f"the weights at step {self.step} are not finite on some rank; no checkpoint was written "
                f"(the last good one is in {checkpoint.checkpoint_root(self.cfg.output_dir)})"
            )

    def count_update(self, skipped: bool) -> None:
        """The non-finite counters after one step's agreement (identical on every rank)."""
        if not skipped:
            self.nonfinite["consecutive"] = 0
            return
        self.nonfinite["skipped_total"] += 1
        self.nonfinite["consecutive"] += 1
        logger.warning(
            "step %d: non-finite %s on some rank; the update was skipped (%d in a row, %d in all)",
            self.step,
            self.what_is_checked,
            self.nonfinite["consecutive"],
            self.nonfinite["skipped_total"],
        )

    def log_step(self, metrics: dict[str, float], postfix: dict[str, str]) -> None:
        """Log this step's metrics, advance the step and the progress bar."""
        self.run_logger.log_metrics(metrics, step=self.step)
        self.losses.append(metrics["loss"])
        self.step += 1
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(**postfix)

    def stop_if_nonfinite(self, save) -> None:
        """After too many consecutive skipped steps: a checkpoint of the last good weights (skipped steps
        never updated them), the MLflow run marked FAILED, and NonFiniteTrainingError."""
        cfg = self.cfg
        if self.nonfinite["consecutive"] < cfg.train.max_nonfinite_steps:
            return
        save()
        self.run_logger.finish("FAILED")
        raise NonFiniteTrainingError(
            f"{self.nonfinite['consecutive']} consecutive steps had a non-finite {self.what_is_checked} "
            f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); stopped at step {self.step} "
            f"with a good checkpoint in {checkpoint.checkpoint_root(cfg.output_dir)}"
        )

    def evaluation_due(self, has_eval_data: bool) -> bool:
        every = self.cfg.train.eval_every
        return (
            has_eval_data and bool(every) and self.step % every == 0 and self.step < self.cfg.train.max_steps
        )

    def save_or_stop(self, stop_requests: float, save) -> None:
        """Every `train.save_every` steps a checkpoint; after a stop signal on any rank (the same count on
        every rank: it rode in the metrics all-reduce) a checkpoint and stop.TrainingStopped."""
        cfg = self.cfg
        saving = bool(cfg.train.save_every) and self.step % cfg.train.save_every == 0
        stopping = stop_requests > 0
        if (saving or stopping) and self.step < cfg.train.max_steps:
            save()
            if stopping:
                self._stop_after_checkpoint(int(stop_requests))

    def _stop_after_checkpoint(self, ranks: int) -> None:
        """Every rank, after the stop checkpoint: note it and raise stop.TrainingStopped. The MLflow run
        stays open (RUNNING): the resumed job reopens it by the id in the checkpoint."""
        step = self.step
        folder = os.path.join(checkpoint.checkpoint_root(self.cfg.output_dir), checkpoint.tag_for(step))
        signals = stop.received()
        logger.warning(
            "stop requested on %d of %d ranks (here: %s): checkpoint %s written; exiting with %d",
            ranks,
            self.world_size,
            ", ".join(signals) or "none",
            folder,
            stop.EXIT_STOPPED,
        )
        if dist.is_main_process():
            self.run_logger.set_tags({f"hdpo_ds.stopped_at_step.{int(time.time())}": str(step)})
            stop.write_marker(
                {
                    "step": step,
                    "checkpoint": folder,
                    "ranks_signalled": ranks,
                    "world_size": self.world_size,
                    "signals_rank0": signals,
                    "exit_code": stop.EXIT_STOPPED,
                }
            )
        raise stop.TrainingStopped(step, folder, signals)

    # ---- the end
    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def save_final_and_export(self, save) -> None:
        """The final checkpoint (unless this step's exists) and the Hugging Face export (under LoRA: the
        adapter, in PEFT's format, at output_dir/hf/adapter, and with train.export_merged the merged model
        in output_dir/hf)."""
        if self.last_saved != self.step:
            save()
        if not self.cfg.train.export_hf:
            return
        if lora_enabled(self.cfg):  # the adapter in PEFT's format; the base model is model.name_or_path
            lora.export_adapter(self.policy, os.path.join(self.cfg.output_dir, "hf", "adapter"))
            if self.cfg.train.export_merged:  # merged by rank 0 from the final checkpoint, a tensor at a time
                folder = checkpoint.latest_complete(os.path.join(self.cfg.output_dir, "checkpoints"))
                export.export_merged_from_checkpoint(
                    folder, os.path.join(self.cfg.output_dir, "hf"), self.device
                )
        else:
            export.export_hf(self.policy, self.tokenizer, os.path.join(self.cfg.output_dir, "hf"))

    def result(self) -> TrainResult:
        return TrainResult(
            self.run_logger.run_id,
            self.run_logger.tracking_uri,
            self.cfg.output_dir,
            self.step,
            list(self.losses),
        )

    def write_run_info(self, info: dict) -> None:
        """Rank 0: output_dir/run_info.json. A finished run started again trained nothing: its
        run_info.json (final loss, alerts) stays as it is."""
        path = os.path.join(self.cfg.output_dir, "run_info.json")
        if dist.is_main_process() and not (self.finished_before and os.path.exists(path)):
            write_json(path, info)
