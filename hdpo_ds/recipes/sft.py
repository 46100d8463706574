"""Supervised fine-tuning as a recipe object on the same session as preference training (docs/design.md §6).

    deepspeed launch/sft.py --ds ds_configs/zero3.json --config configs/toy/sft.yaml [key.sub=value ...]

Records and tokenization: data/sft.py. The splits, `data.split`, the row slices (`data.rows`,
`data.eval_rows`) and the tokenization options come from recipes/splits.py, as in preference training.

One optimizer step = `train.pairs_per_step` sequences (global), packed into `data.max_tokens_per_micro_batch`
micro-batches exactly as preference pairs are (data/packing.py: pack_sequences), the same number on every
rank. The loss is the mean negative log-likelihood per completion token over the whole step: each
micro-batch's summed NLL is scaled by world_size / (the step's completion tokens, all ranks), so that
DeepSpeed's mean over ranks gives exactly that gradient. Checkpoints, resume, the HF export, MLflow, the
non-finite guard (`train.max_nonfinite_steps`), the stop on SIGUSR1 / SIGTERM (runtime/stop.py) and the
fault-injection variables are the session's (recipes/session.py), as in preference training; evaluation
reads the first `train.eval_pairs` eval sequences (0: all). The sections `loss`, `reference` and
`monitors`, `train.top_k`, `train.dump_gradients_at` and `data.num_proc` do not apply: a value other
than the default is refused at start-up.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from hdpo_ds.config import Config, ConfigError, flatten, to_dict
from hdpo_ds.data import collate_sequences, pack_sequences
from hdpo_ds.data.records import DataError, RawTable, read_table
from hdpo_ds.data.sft import SFTData, tokenize_sft
from hdpo_ds.objectives.logprobs import token_stats
from hdpo_ds.recipes.session import TrainingSession, TrainResult
from hdpo_ds.recipes.splits import main_process_first, split_sources, tokenize_options
from hdpo_ds.runtime import dist, engine, perf, stop
from hdpo_ds.runtime.models import check_model_source

logger = logging.getLogger(__name__)

__all__ = ["SFTRecipe", "check_sft_config", "load_sft_split", "read_sft_sources", "train_sft"]

_SUMS = ("nll", "tokens", "entropy", "correct")

# Config keys SFT has no use for (it has no reference, no preference loss and no detectors).
_UNUSED_PREFIXES = ("loss.", "reference.", "monitors.")
_UNUSED_KEYS = (
    "train.top_k",
    "train.dump_gradients_at",
    "train.fused_head",
    "model.router_aux_loss_coef",
    "data.num_proc",  # SFT tokenizes on rank 0 in one process (data/sft.py)
    "train.sequence_parallel",  # preference training only (runtime/sequence_parallel.py)
)


def check_sft_config(cfg: Config) -> None:
    """Refuse, by key, a non-default value of a key SFT does not use (it would be silently ignored)."""
    defaults = flatten(to_dict(Config()))
    for key, value in flatten(to_dict(cfg)).items():
        if (key.startswith(_UNUSED_PREFIXES) or key in _UNUSED_KEYS) and value != defaults[key]:
            raise ConfigError(
                f"{key}: does not apply to SFT (launch/sft.py has no reference, preference loss, monitors, "
                "top-k statistics, gradient dumps, fused head, router loss, sequence parallelism or worker "
                f"pool); leave it at its default {defaults[key]!r}"
            )
    for i, entry in enumerate(cfg.data.train_files):
        if isinstance(entry, dict) and "weight" in entry:
            raise ConfigError(
                f"data.train_files[{i}].weight: SFT does not sample by weight (an SFT epoch is every record "
                "once); leave weight out (path, split and rows apply)"
            )
    if cfg.model.lora.r > 0:  # LoRA is wired into preference training only (recipes/preference.py)
        raise ConfigError(
            f"model.lora.r: {cfg.model.lora.r}: LoRA is not available for SFT yet (launch/sft.py trains the "
            "whole model); leave it at 0"
        )


def read_sft_sources(cfg: Config) -> dict[str, RawTable]:
    """Every configured split's raw rows, `data.split` and the row slices applied; before any engine.
    A bad row slice or a source that cannot be read is reported under its config key."""
    tables = {}
    for name, (key, files, rows) in split_sources(cfg).items():
        try:
            tables[name] = read_table(files, split=cfg.data.split or None, rows=rows or None)
        except DataError as e:
            raise DataError(str(e), source=key, kind=e.kind) from None
    return tables


def load_sft_split(cfg: Config, name: str, raw: RawTable, tokenizer) -> SFTData:
    """Tokenize one split with the run's options; collective (rank 0 first, it writes the cache)."""
    options = tokenize_options(cfg)
    data = main_process_first(
        name, lambda main: tokenize_sft(raw, tokenizer, is_main_process=main, **options)
    )
    key = split_sources(cfg)[name][0]
    if data.skipped:
        logger.warning("%s: skipped %s", key, ", ".join(f"{k}={v}" for k, v in sorted(data.skipped.items())))
    if any(data.stats.values()):
        logger.info("%s: %s", key, ", ".join(f"{k}={v}" for k, v in data.stats.items()))
    if not data.ids:
        raise DataError(f"no usable records (skipped: {data.skipped})", source=key)
    return data


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _step_indices(n: int, per_step: int, seed: int, step: int) -> np.ndarray:
    """The examples of global step `step`: epochs of a seeded permutation, steps never straddle epochs."""
    steps_per_epoch = max(1, n // per_step)
    epoch, k = divmod(step, steps_per_epoch)
    return _permutation(n, seed, epoch)[k * per_step : (k + 1) * per_step]


def _metrics(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    tokens = max(sums["tokens"], 1.0)
    return {
        f"{prefix}loss": sums["nll"] / tokens,
        f"{prefix}entropy": sums["entropy"] / tokens,
        f"{prefix}token_accuracy": sums["correct"] / tokens,
        f"{prefix}tokens": sums["tokens"],
    }


class SFTRecipe:
    """SFT on every rank; rank 0 alone logs to MLflow. State: the session's (step, non-finite counters,
    last saved step); the data order is a function of the seed and the step (`_step_indices`)."""

    def __init__(self, cfg: Config, ds_config_path: str) -> None:
        self.cfg = cfg
        self.session = TrainingSession(cfg, ds_config_path, what_is_checked="loss")
        self._ready = False

    @property
    def step(self) -> int:
        return self.session.step

    def setup(self) -> None:
        """Collective: config checks and the sources before any engine, then the data, the policy engine,
        resume and the MLflow run."""
        cfg, s = self.cfg, self.session
        check_sft_config(cfg)
        check_model_source(cfg.model)
        s.load_tokenizer()
        sources = read_sft_sources(cfg)

        s.start_distributed()
        splits = {name: load_sft_split(cfg, name, raw, s.tokenizer) for name, raw in sources.items()}
        self.train_data, self.eval_data = splits["train"], splits.get("eval")
        if len(self.train_data.ids) < cfg.train.pairs_per_step:
            raise DataError(
                f"{len(self.train_data.ids)} usable records, fewer than "
                f"train.pairs_per_step={cfg.train.pairs_per_step}",
                source="data.train_files",
            )
        s.find_resume_point()
        s.resolve_dtype()
        s.build_policy()
        s.load_checkpoint()
        s.setup_perf()
        params = {"run.mode": "sft", **s.run_params()}
        params["run.train_sequences"] = len(self.train_data.ids)
        params["run.eval_sequences"] = len(self.eval_data.ids) if self.eval_data else 0
        params.update({f"data.skipped.{k}": v for k, v in self.train_data.skipped.items()})
        params.update({f"data.{k}": v for k, v in self.train_data.stats.items()})
        s.open_logger(params, {"ds_config.json": s.policy_ds})
        if dist.is_main_process():
            logger.info("SFT: attention %s; MLflow run %s", s.loaded.attn_implementation, s.run_logger.run_id)
        s.open_progress("SFT")
        self._ready = True

    def _run(
        self, data: SFTData, indices: np.ndarray, *, scale_tokens: float = 1.0, train: bool = False
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """This rank's micro-batches of `indices`; with `train` also the backward and, at the last
        micro-batch, the optimizer update. Returns this rank's sums (with `train` also the model FLOPs and
        real tokens of its trained micro-batches) and whether the update was skipped:
        a non-finite NLL on any rank (one collective decides) drops the step's gradients everywhere."""
        cfg, s = self.cfg, self.session
        policy, device = s.policy, s.device
        packed = pack_sequences(
            data.lengths[indices],
            world_size=s.world_size,
            max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch,
            packing=cfg.data.packing,
        )
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in _SUMS}
        bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite NLL on this rank
        skipped = False
        mbs = packed.for_rank(s.rank)
        flops, real_tokens = 0.0, 0  # of this rank's trained micro-batches (perf/*)
        for i, mb in enumerate(mbs):
            chosen = [int(indices[p]) for p in mb.pairs]
            host = collate_sequences(
                [(data.prompts[j], data.completions[j]) for j in chosen],
                [data.ids[j] for j in chosen],
                pad_token_id=s.tokenizer.pad_token_id,
                packing=cfg.data.packing,
                weight=0.0 if mb.filler else 1.0,
            )
            if train and not mb.filler:
                real_tokens += host.num_real_tokens
                flops += perf.micro_batch_flops(
                    s.flop_counts, host.num_real_tokens, host.sum_squared_lengths()
                )
            batch = host.to(device)
            with torch.set_grad_enabled(train):
                logits = policy(**batch.model_inputs()).logits
                stats = token_stats(logits, batch.labels, top_k=1, chunk_size=cfg.train.logits_chunk_size)
                nll = -stats.logps.sum()
            if train:
                last = i == len(mbs) - 1
                nll = s.faults.plant_nan(s.step, i, nll)
                finite = torch.isfinite(nll)
                bad |= ~finite
                policy.set_gradient_accumulation_boundary(last)
                # As in preference training: a non-finite NLL backs off to 0 and the step is skipped.
                loss = torch.where(finite, nll, torch.zeros_like(nll))
                policy.backward(loss * (s.world_size / scale_tokens) * batch.weight)
                if not last:
                    policy.step()
                else:
                    bad |= ~engine.local_all_finite(policy, "grad", device)  # a finite loss, a bad gradient
                    if skipped := dist.all_agree(bad, device=device):
                        engine.discard_gradients(policy)  # no update: optimizer, scheduler, counters stay
                    else:
                        policy.step()
            if not mb.filler:
                mask = batch.labels != -100
                sums["nll"] += nll.detach().double()
                sums["tokens"] += mask.sum()
                sums["entropy"] += stats.entropy[mask].double().sum()
                sums["correct"] += (logits.detach().argmax(-1) == batch.labels)[mask].sum()
        if train:  # reduced with the rest in the step's one all-reduce (evaluate sums _SUMS only)
            sums.update(model_flops=flops, real_tokens=real_tokens)
        return sums, skipped

    def train_step(self) -> tuple[dict[str, float], float]:
        """One optimizer step (collective); returns its metrics and how many ranks got a stop signal."""
        cfg, s = self.cfg, self.session
        started = time.perf_counter()
        lr = s.policy.get_lr()[0]
        s.policy.train()
        data = self.train_data
        indices = _step_indices(len(data.ids), cfg.train.pairs_per_step, cfg.train.seed, s.step)
        step_tokens = float(sum(len(data.completions[j]) for j in indices))  # known on every rank
        part, skipped = self._run(data, indices, scale_tokens=step_tokens, train=True)
        part["stop_requests"] = 1.0 if stop.received() else 0.0  # rides in the step's metric all-reduce
        sums = dist.reduce_sums(part, device=s.device)
        elapsed = time.perf_counter() - started
        s.count_update(skipped)
        metrics = _metrics(sums)
        metrics["lr"] = lr
        metrics["tokens_per_second"] = sums["tokens"] / elapsed
        # tokens/s per device counts every token the model ran (prompts too), as in preference training
        metrics.update(
            perf.step_metrics(sums["model_flops"], sums["real_tokens"], elapsed, s.world_size, s.peak_tflops)
        )
        metrics["nonfinite/skipped_steps"] = s.nonfinite["skipped_total"]
        return metrics, sums["stop_requests"]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics on the first `train.eval_pairs` eval sequences (0: all), under `eval/`."""
        cfg, s, data = self.cfg, self.session, self.eval_data
        s.policy.eval()
        count = min(cfg.train.eval_pairs, len(data.ids)) if cfg.train.eval_pairs else len(data.ids)
        total = dict.fromkeys(_SUMS, 0.0)
        for start in range(0, count, cfg.train.pairs_per_step):
            indices = np.arange(start, min(start + cfg.train.pairs_per_step, count))
            part = dist.reduce_sums(self._run(data, indices)[0], device=s.device)
            total = {k: total[k] + part[k] for k in total}
        s.policy.train()
        return _metrics(total, "eval/")

    def save(self) -> None:
        self.session.save({"mode": "sft"})

    def run(self) -> TrainResult:
        """Setup (unless done), the loop to train.max_steps, and finish."""
        if not self._ready:
            self.setup()
        s = self.session
        while s.step < self.cfg.train.max_steps:
            s.faults.maybe_kill(s.step)
            metrics, stop_requests = self.train_step()
            postfix = {
                "loss": f"{metrics['loss']:.4f}",
                "acc": f"{metrics['token_accuracy']:.3f}",
                "mfu": f"{metrics['perf/mfu']:.1%}",
            }
            s.log_step(metrics, postfix)
            s.stop_if_nonfinite(self.save)
            if s.evaluation_due(self.eval_data is not None):
                s.run_logger.log_metrics(self.evaluate(), step=s.step)
            s.save_or_stop(stop_requests, self.save)
        return self.finish()

    def finish(self) -> TrainResult:
        """The final evaluation, checkpoint and export (unless resumed from the final checkpoint), and
        run_info.json."""
        s = self.session
        s.close_progress()
        final_eval = None
        if not s.finished_before:
            if self.eval_data is not None:
                final_eval = self.evaluate()
                s.run_logger.log_metrics(final_eval, step=s.step)
                logger.info(
                    "SFT eval at step %d: %s",
                    s.step,
                    ", ".join(f"{k} {v:.4f}" for k, v in final_eval.items()),
                )
            s.save_final_and_export(self.save)
        result = s.result()
        s.run_logger.finish("FINISHED")
        s.write_run_info(
            {
                "mode": "sft",
                "run_id": result.run_id,
                "tracking_uri": result.tracking_uri,
                "steps": s.step,
                "world_size": s.world_size,
                "attn_implementation": s.loaded.attn_implementation,
                "final_loss": result.losses[-1] if result.losses else None,
                "final_eval": final_eval,
                "skipped": self.train_data.skipped,
                "truncated": self.train_data.stats,
            }
        )
        return result


def train_sft(cfg: Config, ds_config_path: str) -> TrainResult:
    """The SFT recipe on every rank; rank 0 logs to MLflow. Returns the per-step losses."""
    return SFTRecipe(cfg, ds_config_path).run()
