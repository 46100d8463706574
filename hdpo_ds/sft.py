"""Supervised fine-tuning on the same engine, packing, checkpoints and logging as the preference trainer.

    deepspeed launch/sft.py --ds ds_configs/zero3.json --config configs/toy/sft.yaml [key.sub=value ...]

Records: `prompt` (a string, or role/content messages rendered with the chat template) and `completion`
(a string); an optional `id`. Token ids follow the preference data's rules (hdpo_ds/data/tokenize.py): a
text prompt is the tokenizer's special prefix + its tokens and the completion is
tok(prompt + completion)[len(tok(prompt)):] + EOS; a conversation gets the completion as the assistant's
message, cut after its EOS. Records longer than `data.max_length` (or with a prompt longer than
`data.max_prompt_length`) are skipped and counted (`data.on_bad_record=skip` also skips malformed ones,
counted by reason); nothing is truncated, so no target loses its end.

One optimizer step = `train.pairs_per_step` sequences (global), packed into `data.max_tokens_per_micro_batch`
micro-batches exactly as preference pairs are (hdpo_ds/data/packing.py: plan_sequences), the same number on
every rank. The loss is the mean negative log-likelihood per completion token over the whole step: each
micro-batch's summed NLL is scaled by world_size / (the step's completion tokens, all ranks), so that
DeepSpeed's mean over ranks gives exactly that gradient. Checkpoints, resume, the HF export and MLflow work
as in training (hdpo_ds/trainer.py); the config sections `loss`, `reference` and `monitors` are unused.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from hdpo_ds import checkpoint, dist, engine
from hdpo_ds.atomic import write_json
from hdpo_ds.config import Config, flatten, to_dict
from hdpo_ds.data import collate_sequences, plan_sequences
from hdpo_ds.data.records import DataError, read_rows, row_error
from hdpo_ds.data.tokenize import encode_prompt, resolve_chat_template
from hdpo_ds.logprobs import token_stats
from hdpo_ds.metrics import MlflowLogger, NullLogger, package_versions
from hdpo_ds.models import check_model_source, load_model, load_model_config, load_tokenizer
from hdpo_ds.trainer import TrainResult, lr_multiplier, resume_point

logger = logging.getLogger(__name__)

__all__ = ["SFTData", "load_sft_split", "train_sft"]


class SFTData:
    """Tokenized SFT examples: `prompts[i]`, `completions[i]` (lists of ids), `ids[i]`; `skipped`
    counts what was left out, by reason."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.prompts: list[list[int]] = []
        self.completions: list[list[int]] = []
        self.skipped: dict[str, int] = {}

    @property
    def lengths(self) -> np.ndarray:
        return np.array(
            [len(p) + len(c) for p, c in zip(self.prompts, self.completions, strict=True)], dtype=np.int64
        )

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _completion_ids(tokenizer, prompt, completion: str, template, where: dict) -> list[int]:
    eos = tokenizer.eos_token_id
    if isinstance(prompt, str):
        plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        if full[: len(plain)] != plain:
            raise DataError("tokenizer merges across the prompt/completion boundary; end the prompt where a token ends",
                            field="completion", kind="boundary_merge", **where)  # fmt: skip
        ids = list(full[len(plain) :])
        return ids if ids and ids[-1] == eos else [*ids, eos]
    prompt_text = tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True, chat_template=template
    )
    full_text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": completion}], tokenize=False,
                                              chat_template=template)  # fmt: skip
    if not full_text.startswith(prompt_text):
        raise DataError("the chat template renders the prompt differently from the start of the conversation",
                        field="completion", kind="template_mismatch", **where)  # fmt: skip
    ids = list(tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"])
    if eos in ids:  # what a template writes after EOS is never generated
        return ids[: len(ids) - ids[::-1].index(eos)]
    return [*ids, eos]


def load_sft_split(cfg: Config, files: list[str], key: str, tokenizer) -> SFTData:
    """Read, validate and tokenize one split's records (`key` names its config key in errors)."""
    template = resolve_chat_template(tokenizer, cfg.data.chat_template or None)
    data = SFTData()
    for spec in files:
        try:
            sources = list(read_rows(spec))
        except DataError as e:
            raise DataError(str(e), source=key, kind=e.kind) from None
        for source, rows in sources:
            for i, row in enumerate(rows):
                where = {"source": source, "index": i}
                try:
                    err = row_error(row, **where)
                    if err is not None:
                        raise err
                    prompt, completion = row.get("prompt"), row.get("completion")
                    if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
                        raise DataError("missing or empty (a string or a list of messages)", field="prompt",
                                        kind="missing_field", **where)  # fmt: skip
                    if not isinstance(completion, str) or not completion:
                        raise DataError(
                            "missing or empty (a string)", field="completion", kind="missing_field", **where
                        )
                    prompt_ids = encode_prompt(tokenizer, prompt, template)
                    completion_ids = _completion_ids(tokenizer, prompt, completion, template, where)
                except DataError as err:
                    if cfg.data.on_bad_record == "error":
                        raise
                    logger.warning("skipped: %s", err)
                    data.skip(err.kind)
                    continue
                if (
                    len(prompt_ids) > cfg.data.max_prompt_length
                    or len(prompt_ids) + len(completion_ids) > cfg.data.max_length
                ):
                    data.skip("dropped_overlength")
                    continue
                data.ids.append(str(row.get("id", f"{os.path.basename(source)}:{i}")))
                data.prompts.append(prompt_ids)
                data.completions.append(completion_ids)
    if data.skipped:
        logger.warning("%s: skipped %s", key, ", ".join(f"{k}={v}" for k, v in sorted(data.skipped.items())))
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


def _run(cfg: Config, policy, data: SFTData, indices: np.ndarray, device, pad: int, *, train: bool,
         scale_tokens: float) -> dict[str, torch.Tensor]:  # fmt: skip
    """This rank's micro-batches of one step (train: with backward and the optimizer step at the end)."""
    plan = plan_sequences(data.lengths[indices], world_size=dist.world_size(),
                          max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch, packing=cfg.data.packing)  # fmt: skip
    sums = {
        k: torch.zeros((), dtype=torch.float64, device=device)
        for k in ("nll", "tokens", "entropy", "correct")
    }
    mbs = plan.for_rank(dist.rank())
    for i, mb in enumerate(mbs):
        chosen = [int(indices[p]) for p in mb.pairs]
        batch = collate_sequences([(data.prompts[j], data.completions[j]) for j in chosen], [data.ids[j] for j in chosen],
                                  pad_token_id=pad, packing=cfg.data.packing, weight=0.0 if mb.filler else 1.0).to(device)  # fmt: skip
        with torch.set_grad_enabled(train):
            logits = policy(**batch.model_inputs()).logits
            stats = token_stats(logits, batch.labels, top_k=1, chunk_size=cfg.train.logits_chunk_size)
            nll = -stats.logps.sum()
        if train:
            policy.set_gradient_accumulation_boundary(i == len(mbs) - 1)
            policy.backward(nll * (dist.world_size() / scale_tokens) * batch.weight)
            policy.step()
        if not mb.filler:
            mask = batch.labels != -100
            sums["nll"] += nll.detach().double()
            sums["tokens"] += mask.sum()
            sums["entropy"] += stats.entropy[mask].double().sum()
            sums["correct"] += (logits.detach().argmax(-1) == batch.labels)[mask].sum()
    return sums


def _metrics(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    tokens = max(sums["tokens"], 1.0)
    return {f"{prefix}loss": sums["nll"] / tokens, f"{prefix}entropy": sums["entropy"] / tokens,
            f"{prefix}token_accuracy": sums["correct"] / tokens, f"{prefix}tokens": sums["tokens"]}  # fmt: skip


@torch.no_grad()
def _evaluate(cfg: Config, policy, data: SFTData, device, pad: int) -> dict[str, float]:
    policy.eval()
    total = dict.fromkeys(("nll", "tokens", "entropy", "correct"), 0.0)
    for start in range(0, len(data.ids), cfg.train.pairs_per_step):
        indices = np.arange(start, min(start + cfg.train.pairs_per_step, len(data.ids)))
        part = dist.reduce_sums(
            _run(cfg, policy, data, indices, device, pad, train=False, scale_tokens=1.0), device=device
        )
        total = {k: total[k] + part[k] for k in total}
    policy.train()
    return _metrics(total, "eval/")


def train_sft(cfg: Config, ds_config_path: str) -> TrainResult:
    """The SFT recipe on every rank; rank 0 logs to MLflow. Returns the per-step losses."""
    ds_config = engine.load_ds_config(ds_config_path)
    check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    train_data = load_sft_split(cfg, cfg.data.train_files, "data.train_files", tokenizer)
    eval_data = (
        load_sft_split(cfg, cfg.data.eval_files, "data.eval_files", tokenizer)
        if cfg.data.eval_files
        else None
    )
    if len(train_data.ids) < cfg.train.pairs_per_step:
        raise DataError(f"{len(train_data.ids)} usable records, fewer than train.pairs_per_step="
                        f"{cfg.train.pairs_per_step}", source="data.train_files")  # fmt: skip

    engine.init_distributed()
    world_size, device = dist.world_size(), engine.current_device()
    if dist.is_main_process():
        os.makedirs(cfg.output_dir, exist_ok=True)
    resume_folder, resume_state = resume_point(cfg, world_size)
    dtype = engine.resolve_dtype(cfg, ds_config)
    hidden = getattr(load_model_config(cfg.model), "hidden_size", None)
    ds = engine.fill_ds_config(
        ds_config, cfg, world_size=world_size, device_type=engine.device_type(), hidden_size=hidden
    )
    zero3_handle = engine.zero3_loading(ds)
    loaded = load_model(cfg.model, dtype=dtype, device_type=engine.device_type(), seed=cfg.train.seed,
                        packing=cfg.data.packing)  # fmt: skip
    del zero3_handle
    schedule = dict(warmup_steps=cfg.optim.warmup_steps, max_steps=cfg.train.max_steps,
                    schedule=cfg.optim.schedule, min_lr_ratio=cfg.optim.min_lr_ratio)  # fmt: skip
    policy = engine.build_policy_engine(loaded.model, ds, lambda s: lr_multiplier(s, **schedule))
    step = 0
    if resume_folder:
        checkpoint.load(policy, resume_folder)
        step = resume_state["step"]
        logger.info("resumed from %s at step %d", resume_folder, step)

    run_logger = NullLogger()
    if dist.is_main_process():
        run_logger = MlflowLogger.for_run(cfg, run_id=resume_state["mlflow_run_id"] if resume_state else None)
        if resume_state:
            run_logger.reopen(step)
        else:
            params = {f"config.{k}": v for k, v in flatten(to_dict(cfg)).items()}
            params.update({f"versions.{k}": v for k, v in package_versions().items()})
            params.update({"run.mode": "sft", "run.world_size": world_size, "run.device": engine.device_type(),
                           "run.dtype": str(dtype).removeprefix("torch."), "run.attn_implementation": loaded.attn_implementation,
                           "run.train_sequences": len(train_data.ids),
                           "run.eval_sequences": len(eval_data.ids) if eval_data else 0})  # fmt: skip
            params.update({f"data.skipped.{k}": v for k, v in train_data.skipped.items()})
            run_logger.log_params(params)
            run_logger.log_json_artifact("ds_config.json", ds)
        logger.info("SFT: attention %s; MLflow run %s", loaded.attn_implementation, run_logger.run_id)

    def save() -> None:
        state = {"step": step, "mlflow_run_id": dist.broadcast_object(run_logger.run_id), "config": to_dict(cfg),
                 "world_size": world_size, "dtype": str(dtype).removeprefix("torch."), "mode": "sft"}  # fmt: skip
        checkpoint.save(
            policy, cfg.output_dir, step, state, keep=cfg.train.keep_checkpoints, tokenizer=tokenizer
        )

    progress = None
    if dist.is_main_process() and cfg.logging.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.max_steps, initial=step, desc="SFT")
    result = TrainResult(run_logger.run_id, getattr(run_logger, "tracking_uri", None), cfg.output_dir, step)
    pad = tokenizer.pad_token_id
    finished_before = step >= cfg.train.max_steps
    while step < cfg.train.max_steps:
        started = time.perf_counter()
        lr = policy.get_lr()[0]
        policy.train()
        indices = _step_indices(len(train_data.ids), cfg.train.pairs_per_step, cfg.train.seed, step)
        step_tokens = float(sum(len(train_data.completions[j]) for j in indices))  # known on every rank
        sums = dist.reduce_sums(_run(cfg, policy, train_data, indices, device, pad, train=True, scale_tokens=step_tokens),
                                device=device)  # fmt: skip
        metrics = _metrics(sums)
        metrics.update({"lr": lr, "tokens_per_second": sums["tokens"] / (time.perf_counter() - started)})
        run_logger.log_metrics(metrics, step=step)
        result.losses.append(metrics["loss"])
        step += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['token_accuracy']:.3f}")
        if (
            eval_data is not None
            and cfg.train.eval_every
            and step % cfg.train.eval_every == 0
            and step < cfg.train.max_steps
        ):
            run_logger.log_metrics(_evaluate(cfg, policy, eval_data, device, pad), step=step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
            save()
    if progress is not None:
        progress.close()
    final_eval = None
    if not finished_before:
        if eval_data is not None:
            final_eval = _evaluate(cfg, policy, eval_data, device, pad)
            run_logger.log_metrics(final_eval, step=step)
            logger.info(
                "SFT eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in final_eval.items())
            )
        save()
        if cfg.train.export_hf:
            checkpoint.export_hf(policy, tokenizer, os.path.join(cfg.output_dir, "hf"))
    result.steps = step
    run_logger.finish("FINISHED")
    if dist.is_main_process() and not finished_before:
        write_json(os.path.join(cfg.output_dir, "run_info.json"),
                   {"mode": "sft", "run_id": result.run_id, "tracking_uri": result.tracking_uri, "steps": step,
                    "world_size": world_size, "attn_implementation": loaded.attn_implementation,
                    "final_loss": result.losses[-1] if result.losses else None, "final_eval": final_eval,
                    "skipped": train_data.skipped})  # fmt: skip
    dist.barrier()
    return result
