"""Supervised fine-tuning on the same engine, packing, checkpoints and logging as the preference trainer.

    deepspeed launch/sft.py --ds ds_configs/zero3.json --config configs/toy/sft.yaml [key.sub=value ...]

Records: `prompt` (a string, or role/content messages rendered with the chat template) and `completion`
(a string); an optional `id`. The splits, `data.split`, the row slices (`data.rows`, `data.eval_rows`) and
the tokenization options come from hdpo_ds/recipes/splits.py, as in training. Token ids follow the preference
data's rules (hdpo_ds/data/tokenize.py): a text prompt is the tokenizer's special prefix + its tokens and
the completion is tok(prompt + completion)[len(tok(prompt)):] + EOS; a conversation gets the completion as
the assistant's message, cut after its EOS. Over-long records follow `data.truncation` as preference pairs
do: `keep_end` / `keep_start` cut a prompt longer than `data.max_prompt_length` (keeping its end and BOS, or
its start), then the end of a completion that does not fit `data.max_length`; `drop` skips the record.
Counted: `truncated_prompt`, `truncated_completion`, `lost_eos`, and skipped records by reason
(`dropped_overlength`; with `data.on_bad_record=skip` the malformed ones). The tokenized split is cached as
Arrow under `data.cache_dir` (default <output_dir>/cache; rank 0 writes it, the other ranks read it).

One optimizer step = `train.pairs_per_step` sequences (global), packed into `data.max_tokens_per_micro_batch`
micro-batches exactly as preference pairs are (hdpo_ds/data/packing.py: pack_sequences), the same number on
every rank. The loss is the mean negative log-likelihood per completion token over the whole step: each
micro-batch's summed NLL is scaled by world_size / (the step's completion tokens, all ranks), so that
DeepSpeed's mean over ranks gives exactly that gradient. Checkpoints, resume, the HF export, MLflow, the
non-finite guard (`train.max_nonfinite_steps`), the stop on SIGUSR1 / SIGTERM (hdpo_ds/runtime/stop.py) and the
fault-injection variables work as in training (hdpo_ds/recipes/preference.py); evaluation reads the first
`train.eval_pairs` eval sequences (0: all). The sections `loss`, `reference` and `monitors`, `train.top_k`
and `train.dump_gradients_at` do not apply: a value other than the default is refused at start-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np
import torch

from hdpo_ds.common.atomic import write_json
from hdpo_ds.common.versions import package_versions
from hdpo_ds.config import Config, ConfigError, flatten, to_dict
from hdpo_ds.data import collate_sequences, pack_sequences
from hdpo_ds.data.records import DataError, RawTable, read_table, row_error
from hdpo_ds.data.tokenize import (
    cached_table,
    encode_prompt,
    resolve_chat_template,
    special_prefix,
    tokenizer_fingerprint,
    truncate_prompt,
)
from hdpo_ds.objectives.logprobs import token_stats
from hdpo_ds.recipes.preference import (
    NonFiniteTrainingError,
    TrainResult,
    _Faults,
    _stop_after_checkpoint,
    lr_multiplier,
    refuse_nonfinite_weights,
    resume_point,
)
from hdpo_ds.recipes.splits import main_process_first, split_sources, tokenize_options
from hdpo_ds.runtime import checkpoint, dist, engine, export, stop
from hdpo_ds.runtime.models import check_model_source, load_model, load_model_config, load_tokenizer
from hdpo_ds.tracking.mlflow_logger import MlflowLogger, NullLogger

logger = logging.getLogger(__name__)

__all__ = ["SFTData", "check_sft_config", "load_sft_split", "read_sft_sources", "tokenize_sft", "train_sft"]

# Bump when the SFT tokenization rules change: it is part of the cache fingerprint.
SFT_TOKENIZE_VERSION = "hdpo_ds.sft_tokenize/1"
_TRUNCATED_PROMPT, _TRUNCATED_COMPLETION, _LOST_EOS = 1, 2, 4
_FLAG_NAMES = {
    _TRUNCATED_PROMPT: "truncated_prompt",
    _TRUNCATED_COMPLETION: "truncated_completion",
    _LOST_EOS: "lost_eos",
}
# Config keys SFT has no use for (it has no reference, no preference loss and no detectors).
_UNUSED_PREFIXES = ("loss.", "reference.", "monitors.")
_UNUSED_KEYS = ("train.top_k", "train.dump_gradients_at")


class SFTData:
    """Tokenized SFT examples: `prompts[i]`, `completions[i]` (lists of ids), `ids[i]`; `skipped` counts
    what was left out, by reason; `stats` what was truncated; `from_cache` / `cache_path`: the Arrow cache."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.prompts: list[list[int]] = []
        self.completions: list[list[int]] = []
        self.skipped: dict[str, int] = {}
        self.stats: dict[str, int] = dict.fromkeys(_FLAG_NAMES.values(), 0)
        self.from_cache = False
        self.cache_path: str | None = None

    @property
    def lengths(self) -> np.ndarray:
        return np.array(
            [len(p) + len(c) for p, c in zip(self.prompts, self.completions, strict=True)], dtype=np.int64
        )

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def check_sft_config(cfg: Config) -> None:
    """Refuse, by key, a non-default value of a key SFT does not use (it would be silently ignored)."""
    defaults = flatten(to_dict(Config()))
    for key, value in flatten(to_dict(cfg)).items():
        if (key.startswith(_UNUSED_PREFIXES) or key in _UNUSED_KEYS) and value != defaults[key]:
            raise ConfigError(
                f"{key}: does not apply to SFT (launch/sft.py has no reference, preference loss, monitors, "
                f"top-k statistics or gradient dumps); leave it at its default {defaults[key]!r}"
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


def _completion_ids(tokenizer, prompt, completion: str, template, where: dict) -> list[int]:
    eos = tokenizer.eos_token_id
    if isinstance(prompt, str):
        plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        if full[: len(plain)] != plain:
            raise DataError(
                "tokenizer merges across the prompt/completion boundary; end the prompt where a token ends",
                field="completion",
                kind="boundary_merge",
                **where,
            )
        ids = list(full[len(plain) :])
        return ids if ids and ids[-1] == eos else [*ids, eos]
    prompt_text = tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True, chat_template=template
    )
    full_text = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": completion}], tokenize=False, chat_template=template
    )
    if not full_text.startswith(prompt_text):
        raise DataError(
            "the chat template renders the prompt differently from the start of the conversation",
            field="completion",
            kind="template_mismatch",
            **where,
        )
    ids = list(tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"])
    if eos in ids:  # what a template writes after EOS is never generated
        return ids[: len(ids) - ids[::-1].index(eos)]
    return [*ids, eos]


def tokenize_sft(
    raw: RawTable,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation: str = "keep_end",
    chat_template: str | None = None,
    cache_dir: str | None = None,
    on_bad_record: str = "error",
    is_main_process: bool = True,
) -> SFTData:
    """Validate, tokenize and truncate SFT rows (the keyword arguments are splits.tokenize_options'); the
    result is cached at `cache_dir/sft-tokenized-<fingerprint>` (the rows' fingerprint, the tokenizer and
    these options), so a second run, or another rank, reads it back."""
    template = resolve_chat_template(tokenizer, chat_template)
    key = [SFT_TOKENIZE_VERSION, raw.fingerprint, tokenizer_fingerprint(tokenizer, template)]
    key += [max_length, max_prompt_length, truncation, on_bad_record]
    fingerprint = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    options = {"max_length": max_length, "max_prompt_length": max_prompt_length, "truncation": truncation}
    options["on_bad_record"] = on_bad_record

    def build(cache_file: str | None):
        import pyarrow as pa

        table = _tokenize_rows(raw, tokenizer, template, **options)
        if cache_file is not None:
            with pa.OSFile(cache_file, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        return table

    table, from_cache, path = cached_table(
        build, cache_dir, f"sft-tokenized-{fingerprint[:40]}", fingerprint, is_main_process=is_main_process
    )
    data = SFTData()
    data.from_cache, data.cache_path = from_cache, path
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    for i, drop in enumerate(columns["drop"]):
        if drop:
            data.skip(drop)
            continue
        data.ids.append(columns["id"][i])
        data.prompts.append(columns["prompt_ids"][i])
        data.completions.append(columns["completion_ids"][i])
        for bit, name in _FLAG_NAMES.items():
            data.stats[name] += bool(columns["flags"][i] & bit)
    return data


def _tokenize_rows(
    raw: RawTable,
    tokenizer,
    template,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation: str,
    on_bad_record: str,
):
    """One Arrow row per raw row: id, prompt_ids, completion_ids, flags and a drop reason ('' = kept)."""
    import pyarrow as pa

    out: dict[str, list] = {"id": [], "prompt_ids": [], "completion_ids": [], "flags": [], "drop": []}
    prefix = special_prefix(tokenizer)

    def add(record_id: str, prompt_ids: list[int], completion_ids: list[int], flags: int, drop: str) -> None:
        for name, value in zip(out, (record_id, prompt_ids, completion_ids, flags, drop), strict=True):
            out[name].append(value)

    for source, i, row in raw.rows:
        where = {"source": source, "index": i}
        record_id = f"{os.path.basename(source)}:{i}"
        try:
            err = row_error(row, **where)
            if err is not None:
                raise err
            record_id = str(row.get("id", record_id))
            prompt, completion = row.get("prompt"), row.get("completion")
            if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
                raise DataError(
                    "missing or empty (a string or a list of messages)",
                    field="prompt",
                    kind="missing_field",
                    **where,
                )
            if not isinstance(completion, str) or not completion:
                raise DataError(
                    "missing or empty (a string)", field="completion", kind="missing_field", **where
                )
            prompt_ids = encode_prompt(tokenizer, prompt, template)
            completion_ids = _completion_ids(tokenizer, prompt, completion, template, where)
        except DataError as err:
            if on_bad_record == "error":
                raise
            logger.warning("skipped: %s", err)
            add(record_id, [], [], 0, err.kind)
            continue
        flags = 0
        if len(prompt_ids) > max_prompt_length or len(prompt_ids) + len(completion_ids) > max_length:
            if truncation == "drop":
                add(record_id, [], [], 0, "dropped_overlength")
                continue
            if len(prompt_ids) > max_prompt_length:
                prompt_ids = truncate_prompt(prompt_ids, max_prompt_length, truncation, prefix)
                flags |= _TRUNCATED_PROMPT
            room = max_length - len(prompt_ids)  # >= 1: max_prompt_length < max_length
            if len(completion_ids) > room:
                flags |= _TRUNCATED_COMPLETION | (
                    _LOST_EOS if completion_ids[-1] == tokenizer.eos_token_id else 0
                )
                completion_ids = completion_ids[:room]
        add(record_id, prompt_ids, completion_ids, flags, "")
    ids = pa.list_(pa.int32())
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prompt_ids", ids),
            ("completion_ids", ids),
            ("flags", pa.int32()),
            ("drop", pa.string()),
        ]
    )
    return pa.table(out, schema=schema)


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


def _run(
    cfg: Config,
    policy,
    data: SFTData,
    indices: np.ndarray,
    device,
    pad: int,
    *,
    scale_tokens: float = 1.0,
    train_step: int | None = None,
    faults: _Faults | None = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """This rank's micro-batches of `indices`; with `train_step` (the global step) also the backward and,
    at the last micro-batch, the optimizer update. Returns this rank's sums and whether the update was
    skipped: a non-finite NLL on any rank (one collective decides) drops the step's gradients everywhere."""
    train = train_step is not None
    packed = pack_sequences(
        data.lengths[indices],
        world_size=dist.world_size(),
        max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch,
        packing=cfg.data.packing,
    )
    sums = {
        k: torch.zeros((), dtype=torch.float64, device=device)
        for k in ("nll", "tokens", "entropy", "correct")
    }
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite NLL on this rank
    skipped = False
    mbs = packed.for_rank(dist.rank())
    for i, mb in enumerate(mbs):
        chosen = [int(indices[p]) for p in mb.pairs]
        batch = collate_sequences(
            [(data.prompts[j], data.completions[j]) for j in chosen],
            [data.ids[j] for j in chosen],
            pad_token_id=pad,
            packing=cfg.data.packing,
            weight=0.0 if mb.filler else 1.0,
        ).to(device)
        with torch.set_grad_enabled(train):
            logits = policy(**batch.model_inputs()).logits
            stats = token_stats(logits, batch.labels, top_k=1, chunk_size=cfg.train.logits_chunk_size)
            nll = -stats.logps.sum()
        if train:
            last = i == len(mbs) - 1
            nll = faults.plant_nan(train_step, i, nll) if faults is not None else nll
            finite = torch.isfinite(nll)
            bad |= ~finite
            policy.set_gradient_accumulation_boundary(last)
            # As in training: a non-finite NLL backs off to 0 here and the step is then skipped on all ranks.
            loss = torch.where(finite, nll, torch.zeros_like(nll))
            policy.backward(loss * (dist.world_size() / scale_tokens) * batch.weight)
            if not last:
                policy.step()
            else:
                bad |= ~engine.local_all_finite(
                    policy, "grad", device
                )  # a finite loss, a non-finite gradient
                if skipped := dist.all_agree(bad, device=device):
                    engine.discard_gradients(
                        policy
                    )  # no update: optimizer, scheduler and step counters stay put
                else:
                    policy.step()
        if not mb.filler:
            mask = batch.labels != -100
            sums["nll"] += nll.detach().double()
            sums["tokens"] += mask.sum()
            sums["entropy"] += stats.entropy[mask].double().sum()
            sums["correct"] += (logits.detach().argmax(-1) == batch.labels)[mask].sum()
    return sums, skipped


def _metrics(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    tokens = max(sums["tokens"], 1.0)
    return {
        f"{prefix}loss": sums["nll"] / tokens,
        f"{prefix}entropy": sums["entropy"] / tokens,
        f"{prefix}token_accuracy": sums["correct"] / tokens,
        f"{prefix}tokens": sums["tokens"],
    }


@torch.no_grad()
def _evaluate(cfg: Config, policy, data: SFTData, device, pad: int) -> dict[str, float]:
    """Metrics on the first `train.eval_pairs` eval sequences (0: all), under `eval/`."""
    policy.eval()
    count = min(cfg.train.eval_pairs, len(data.ids)) if cfg.train.eval_pairs else len(data.ids)
    total = dict.fromkeys(("nll", "tokens", "entropy", "correct"), 0.0)
    for start in range(0, count, cfg.train.pairs_per_step):
        indices = np.arange(start, min(start + cfg.train.pairs_per_step, count))
        part = dist.reduce_sums(_run(cfg, policy, data, indices, device, pad)[0], device=device)
        total = {k: total[k] + part[k] for k in total}
    policy.train()
    return _metrics(total, "eval/")


def train_sft(cfg: Config, ds_config_path: str) -> TrainResult:
    """The SFT recipe on every rank; rank 0 logs to MLflow. Returns the per-step losses."""
    ds_config = engine.load_ds_config(ds_config_path)
    check_sft_config(cfg)
    check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    sources = read_sft_sources(cfg)

    engine.init_distributed(cfg.train.dist_timeout_minutes)
    world_size, device = dist.world_size(), engine.current_device()
    if dist.is_main_process():
        os.makedirs(cfg.output_dir, exist_ok=True)
    splits = {name: load_sft_split(cfg, name, raw, tokenizer) for name, raw in sources.items()}
    train_data, eval_data = splits["train"], splits.get("eval")
    if len(train_data.ids) < cfg.train.pairs_per_step:
        raise DataError(
            f"{len(train_data.ids)} usable records, fewer than train.pairs_per_step={cfg.train.pairs_per_step}",
            source="data.train_files",
        )
    resume_folder, resume_state = resume_point(cfg, world_size)
    dtype = engine.resolve_dtype(cfg, ds_config)
    hidden = getattr(load_model_config(cfg.model), "hidden_size", None)
    ds = engine.fill_ds_config(
        ds_config, cfg, world_size=world_size, device_type=engine.device_type(), hidden_size=hidden
    )
    zero3_handle = engine.zero3_loading(ds)
    loaded = load_model(
        cfg.model,
        dtype=dtype,
        device_type=engine.device_type(),
        seed=cfg.train.seed,
        packing=cfg.data.packing,
    )
    del zero3_handle
    schedule = dict(
        warmup_steps=cfg.optim.warmup_steps,
        max_steps=cfg.train.max_steps,
        schedule=cfg.optim.schedule,
        min_lr_ratio=cfg.optim.min_lr_ratio,
    )
    policy = engine.build_policy_engine(loaded.model, ds, lambda s: lr_multiplier(s, **schedule))
    step, nonfinite = 0, {"skipped_total": 0, "consecutive": 0}
    if resume_folder:
        checkpoint.load(policy, resume_folder)
        step = resume_state["step"]
        nonfinite = resume_state.get("nonfinite", nonfinite)  # absent in checkpoints before the guard
        logger.info("resumed from %s at step %d", resume_folder, step)

    run_logger = NullLogger()
    if dist.is_main_process():
        run_logger = MlflowLogger.for_run(cfg, run_id=resume_state["mlflow_run_id"] if resume_state else None)
        if resume_state:
            run_logger.reopen(step)
        else:
            params = {f"config.{k}": v for k, v in flatten(to_dict(cfg)).items()}
            params.update({f"versions.{k}": v for k, v in package_versions().items()})
            params.update(
                {
                    "run.mode": "sft",
                    "run.world_size": world_size,
                    "run.device": engine.device_type(),
                    "run.dtype": str(dtype).removeprefix("torch."),
                    "run.attn_implementation": loaded.attn_implementation,
                    "run.train_sequences": len(train_data.ids),
                    "run.eval_sequences": len(eval_data.ids) if eval_data else 0,
                }
            )
            params.update({f"data.skipped.{k}": v for k, v in train_data.skipped.items()})
            params.update({f"data.{k}": v for k, v in train_data.stats.items()})
            run_logger.log_params(params)
            run_logger.log_json_artifact("ds_config.json", ds)
        logger.info("SFT: attention %s; MLflow run %s", loaded.attn_implementation, run_logger.run_id)

    def save() -> None:
        refuse_nonfinite_weights(policy, device, step, cfg.output_dir, run_logger)
        state = {
            "step": step,
            "mlflow_run_id": dist.broadcast_object(run_logger.run_id),
            "config": to_dict(cfg),
            "world_size": world_size,
            "dtype": str(dtype).removeprefix("torch."),
            "mode": "sft",
            "nonfinite": dict(nonfinite),
        }
        checkpoint.save(
            policy, cfg.output_dir, step, state, keep=cfg.train.keep_checkpoints, tokenizer=tokenizer
        )

    progress = None
    if dist.is_main_process() and cfg.logging.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.max_steps, initial=step, desc="SFT")
    result = TrainResult(run_logger.run_id, getattr(run_logger, "tracking_uri", None), cfg.output_dir, step)
    pad = tokenizer.pad_token_id
    faults = _Faults.from_env()
    finished_before = step >= cfg.train.max_steps
    while step < cfg.train.max_steps:
        faults.maybe_kill(step)
        started = time.perf_counter()
        lr = policy.get_lr()[0]
        policy.train()
        indices = _step_indices(len(train_data.ids), cfg.train.pairs_per_step, cfg.train.seed, step)
        step_tokens = float(sum(len(train_data.completions[j]) for j in indices))  # known on every rank
        part, skipped = _run(
            cfg,
            policy,
            train_data,
            indices,
            device,
            pad,
            scale_tokens=step_tokens,
            train_step=step,
            faults=faults,
        )
        part["stop_requests"] = 1.0 if stop.received() else 0.0  # rides in the step's metric all-reduce
        sums = dist.reduce_sums(part, device=device)
        if skipped:
            nonfinite["skipped_total"] += 1
            nonfinite["consecutive"] += 1
            logger.warning(
                "step %d: non-finite loss on some rank; the update was skipped (%d in a row, %d in all)",
                step,
                nonfinite["consecutive"],
                nonfinite["skipped_total"],
            )
        else:
            nonfinite["consecutive"] = 0
        metrics = _metrics(sums)
        metrics["lr"] = lr
        metrics["tokens_per_second"] = sums["tokens"] / (time.perf_counter() - started)
        metrics["nonfinite/skipped_steps"] = nonfinite["skipped_total"]
        run_logger.log_metrics(metrics, step=step)
        result.losses.append(metrics["loss"])
        step += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['token_accuracy']:.3f}")
        if nonfinite["consecutive"] >= cfg.train.max_nonfinite_steps:
            save()  # the weights of the last good step: skipped steps never updated them
            run_logger.finish("FAILED")
            raise NonFiniteTrainingError(
                f"{nonfinite['consecutive']} consecutive steps had a non-finite loss "
                f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); stopped at step {step} with a good "
                f"checkpoint in {checkpoint.checkpoint_root(cfg.output_dir)}"
            )
        if (
            eval_data is not None
            and cfg.train.eval_every
            and step % cfg.train.eval_every == 0
            and step < cfg.train.max_steps
        ):
            run_logger.log_metrics(_evaluate(cfg, policy, eval_data, device, pad), step=step)
        saving = bool(cfg.train.save_every) and step % cfg.train.save_every == 0
        stopping = sums["stop_requests"] > 0  # a signal on any rank: the same decision on every rank
        if (saving or stopping) and step < cfg.train.max_steps:
            save()
            if stopping:
                _stop_after_checkpoint(cfg, step, int(sums["stop_requests"]), world_size, run_logger)
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
            export.export_hf(policy, tokenizer, os.path.join(cfg.output_dir, "hf"))
    result.steps = step
    run_logger.finish("FINISHED")
    if dist.is_main_process() and not finished_before:
        write_json(
            os.path.join(cfg.output_dir, "run_info.json"),
            {
                "mode": "sft",
                "run_id": result.run_id,
                "tracking_uri": result.tracking_uri,
                "steps": step,
                "world_size": world_size,
                "attn_implementation": loaded.attn_implementation,
                "final_loss": result.losses[-1] if result.losses else None,
                "final_eval": final_eval,
                "skipped": train_data.skipped,
                "truncated": train_data.stats,
            },
        )
    dist.barrier()
    return result
