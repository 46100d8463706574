"""Sampling evaluation: pass@k, token entropy and diversity of a model's completions.

    python launch/evaluate.py --model outputs/run/hf --prompts eval.jsonl --checker arith \
        --temperatures 0.5 1.0 --k 1 4 16 -n 32 --out outputs/run/eval.json
    deepspeed --num_accelerators 2 launch/evaluate.py ...    # data-parallel: the prompts are split over ranks

For every prompt and temperature T the model samples `n` completions with plain temperature sampling
(softmax(logits / T); no top-k / top-p, whatever the model's generation config says), batched, with a
KV cache. A checker marks each completion correct or not, and the report has, per temperature:

- ``pass_at_{k}``: the unbiased estimator of Chen et al. 2021 (:func:`pass_at_k`), averaged over prompts;
- ``token_entropy``: the mean entropy (nats) of the model's next-token distribution (T = 1) over the
  sampled tokens, token-weighted; ``token_entropy_sampling``: the same for the distribution sampled from
  (softmax(logits / T));
- ``distinct_{1..4}``: per prompt, distinct token n-grams / all token n-grams over its n completions
  (Li et al. 2016's distinct-n, within one prompt's samples), averaged over prompts;
- ``distinct_correct``: per prompt, the number of distinct correct completions (whitespace-normalised
  text; on a task with one final answer these are distinct solution paths), averaged over prompts;
- ``correct_rate`` (c / n), ``mean_length`` (tokens), ``eos_rate`` (completions that ended with EOS
  before ``max_new_tokens``).

Reproducibility: each (prompt, temperature) has its own random stream, seeded from (seed, prompt index, T),
and sampling draws one uniform number per row and step (inverse-CDF sampling), so a prompt's samples do not
depend on the batch it lands in or on the number of ranks.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from hdpo_ds.common.atomic import write_json
from hdpo_ds.data.records import DataError, read_rows, row_error
from hdpo_ds.data.tokenize import encode_prompt
from hdpo_ds.runtime import dist
from hdpo_ds.runtime.attention import select_attention

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKERS",
    "EvalPrompt",
    "PromptSamples",
    "distinct_n",
    "evaluate_model",
    "load_checker",
    "load_prompts",
    "pass_at_k",
    "sample_completions",
    "summarise",
]


# ---------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
    Code", eq. 1): the probability that at least one of k completions drawn without replacement from n
    samples, c of them correct, is correct: 1 - C(n - c, k) / C(n, k).

    Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which never forms the binomials (their
    quotient overflows floats for n in the hundreds). Needs 0 <= c <= n and 1 <= k <= n.
    """
    if not (
        isinstance(n, int | np.integer)
        and isinstance(c, int | np.integer)
        and isinstance(k, int | np.integer)
    ):
        raise TypeError(f"pass_at_k takes integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------- diversity


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over `sequences` (token ids; Li et al. 2016, "A Diversity-Promoting
    Objective Function for Neural Conversation Models", §4.3). Sequences shorter than n add none; with no
    n-gram at all the result is 0."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------------------------------------- checkers


def check_arith(completion: str, record: dict) -> bool:
    """hdpo_ds.examples.toy.arith's task: the completion ends with "A:<integer>" and that integer equals
    record["answer"]; the steps before it are not checked (any solution path counts)."""
    if "A:" not in completion:
        return False
    tail = completion.rsplit("A:", 1)[1].strip()
    return re.fullmatch(r"-?\d+", tail) is not None and int(tail) == int(str(record["answer"]).strip())


def check_exact(completion: str, record: dict) -> bool:
    """The completion, stripped, equals record["answer"] (a string, or any of a list of strings)."""
    answers = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
    return completion.strip() in {str(a).strip() for a in answers}


def check_contains(completion: str, record: dict) -> bool:
    """record["answer"] (or any of a list) occurs in the completion."""
    answers = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
    return any(str(a) in completion for a in answers)


# Each checker: (completion text, the prompt's whole record) -> correct; the fields each one reads.
CHECKERS: dict[str, tuple[Callable[[str, dict], bool], tuple[str, ...]]] = {
    "arith": (check_arith, ("answer",)),
    "exact": (check_exact, ("answer",)),
    "contains": (check_contains, ("answer",)),
}


def load_checker(spec: str) -> tuple[Callable[[str, dict], bool], tuple[str, ...]]:
    """A built-in checker by name (CHECKERS), or `package.module:function` (a function of
    (completion, record) -> bool; it declares the record fields it needs in `function.fields`, if any)."""
    if spec in CHECKERS:
        return CHECKERS[spec]
    if ":" not in spec:
        raise ValueError(
            f"--checker: unknown checker {spec!r}; use one of {sorted(CHECKERS)} or module:function"
        )
    module_name, _, attr = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--checker: cannot load {spec!r}: {err}") from err
    return function, tuple(getattr(function, "fields", ()))


# ---------------------------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """One prompt to sample from: `record` is its whole row (what the checker reads)."""

    index: int
    id: str
    prompt: str | list[dict]
    record: dict


def load_prompts(spec: str, required_fields: Sequence[str] = (), limit: int = 0) -> list[EvalPrompt]:
    """Rows with `prompt` (a string, or a list of role/content messages) and the checker's fields; an
    optional `id`. A bad row raises DataError naming the file, the record index and the field."""
    prompts: list[EvalPrompt] = []
    seen: dict[str, tuple[str, int]] = {}
    for source, rows in read_rows(spec):
        for i, row in enumerate(rows):
            err = row_error(row, source=source, index=i)
            if err is not None:
                raise err
            prompt = row.get("prompt")
            if isinstance(prompt, list):
                if not prompt or not all(
                    isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt
                ):
                    raise DataError(
                        "a message list needs objects with 'role' and 'content'",
                        source=source,
                        index=i,
                        field="prompt",
                        kind="wrong_type",
                    )
            elif not isinstance(prompt, str) or not prompt:
                raise DataError(
                    "missing or empty (a string or a list of messages is required)",
                    source=source,
                    index=i,
                    field="prompt",
                    kind="missing_field",
                )
            for name in required_fields:
                if row.get(name) is None:
                    raise DataError(
                        "missing (the checker reads it)",
                        source=source,
                        index=i,
                        field=name,
                        kind="missing_field",
                    )
            prompt_id = str(row.get("id", f"{os.path.basename(source)}:{i}"))
            if prompt_id in seen:
                raise DataError(
                    f"duplicate id {prompt_id!r} (first at {seen[prompt_id][0]} record {seen[prompt_id][1]})",
                    source=source,
                    index=i,
                    field="id",
                    kind="duplicate_id",
                )
            seen[prompt_id] = (source, i)
            prompts.append(EvalPrompt(len(prompts), prompt_id, prompt, dict(row)))
            if limit and len(prompts) >= limit:
                return prompts
    if not prompts:
        raise DataError("no prompts", source=spec)
    return prompts


# ---------------------------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class PromptSamples:
    """The n completions of one prompt at one temperature. Token lists exclude the EOS that ended them.

    `entropy_sums[j]` / `sampling_entropy_sums[j]`: completion j's summed per-token entropy of the model's
    distribution (T = 1) / of the distribution it was sampled from, over its generated tokens (EOS
    included); `counts[j]` those tokens' number."""

    index: int
    temperature: float
    tokens: list[list[int]]
    finished: list[bool]
    entropy_sums: list[float]
    sampling_entropy_sums: list[float]
    counts: list[int]


def stream_seed(seed: int, prompt_index: int, temperature: float) -> int:
    """The seed of one (prompt, temperature) stream: independent of batching and ranks."""
    return int(
        np.random.SeedSequence([seed, prompt_index, round(temperature * 1_000_000)]).generate_state(1)[0]
    )


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row r takes the first token whose cumulative probability exceeds u_r.
    probs (R, V) float, uniforms (R,) in [0, 1) -> (R,) token ids."""
    cdf = probs.cumsum(dim=-1)
    targets = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]  # rescaled: cumsum rounding leaves sum != 1
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    prompt_indices: Sequence[int],
    *,
    n: int,
    temperature: float,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    seed: int,
    prompts_per_batch: int = 8,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> Iterator[PromptSamples]:
    """Sample `n` completions of each prompt at `temperature` > 0; yields one PromptSamples per prompt.

    Prompts of a batch are left-padded (an attention mask hides the padding; positions count real tokens
    only); the batch's prompts are run once and their KV cache repeated n times. Decoding stops at EOS per
    row or after `max_new_tokens`. `prompt_indices` name each prompt's random stream (:func:`stream_seed`).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (plain sampling), got {temperature}")
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))  # similar lengths together
    for start in range(0, len(order), prompts_per_batch):
        members = order[start : start + prompts_per_batch]
        yield from _sample_batch(
            model,
            [prompt_ids[i] for i in members],
            [prompt_indices[i] for i in members],
            n=n,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            eos=eos,
            pad_token_id=pad_token_id,
            seed=seed,
            device=device,
        )
        if progress is not None:
            progress(len(members))


def _sample_batch(
    model, prompts, indices, *, n, temperature, max_new_tokens, eos, pad_token_id, seed, device
):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
    mask = mask.repeat_interleave(n, dim=0)
    next_position = positions[:, -1].repeat_interleave(n) + 1
    rows = len(prompts) * n
    generators = [torch.Generator().manual_seed(stream_seed(seed, i, temperature)) for i in indices]

    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    entropy = torch.zeros(rows, dtype=torch.float64, device=device)
    sampling_entropy = torch.zeros(rows, dtype=torch.float64, device=device)
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits, dim=-1)
        scaled = torch.log_softmax(logits / temperature, dim=-1)
        probs = scaled.exp()
        uniforms = torch.cat([torch.rand(n, generator=g, dtype=torch.float64) for g in generators]).to(device)
        token = _draw(probs, uniforms)
        live = ~done
        entropy += torch.where(live, -(logp.exp() * logp).sum(-1).double(), 0.0)
        sampling_entropy += torch.where(live, -(probs * scaled).sum(-1).double(), 0.0)
        token = torch.where(live, token, pad_token_id)
        tokens[:, t] = token
        lengths += live.long()
        done |= live & torch.isin(token, eos)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_position[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
        next_position = next_position + 1

    tokens, lengths, done = tokens.cpu(), lengths.cpu().tolist(), done.cpu().tolist()
    entropy, sampling_entropy = entropy.cpu().tolist(), sampling_entropy.cpu().tolist()
    for b, index in enumerate(indices):
        span = range(b * n, (b + 1) * n)
        yield PromptSamples(
            index=index,
            temperature=temperature,
            # an ending EOS is not part of the text; it is counted in `counts` and the entropies
            tokens=[tokens[r, : lengths[r] - (1 if done[r] else 0)].tolist() for r in span],
            finished=[done[r] for r in span],
            entropy_sums=[entropy[r] for r in span],
            sampling_entropy_sums=[sampling_entropy[r] for r in span],
            counts=[lengths[r] for r in span],
        )


# ---------------------------------------------------------------------------------------------- scoring


def _normalise(text: str) -> str:
    return " ".join(text.split())


def summarise(
    samples: Sequence[PromptSamples],
    correct: Sequence[Sequence[bool]],
    texts: Sequence[Sequence[str]],
    ks: Sequence[int],
) -> dict[str, float]:
    """The report of one temperature (the metric names in the module docstring), from every prompt's
    samples, their correctness and their decoded texts (all in the same prompt order)."""
    n_prompts = len(samples)
    if n_prompts == 0:
        raise ValueError("no samples to summarise")
    out: dict[str, float] = {}
    for k in ks:
        out[f"pass_at_{k}"] = float(np.mean([pass_at_k(len(c), int(sum(c)), k) for c in correct]))
    tokens = sum(sum(s.counts) for s in samples)
    out["token_entropy"] = sum(sum(s.entropy_sums) for s in samples) / max(tokens, 1)
    out["token_entropy_sampling"] = sum(sum(s.sampling_entropy_sums) for s in samples) / max(tokens, 1)
    for order in (1, 2, 3, 4):
        out[f"distinct_{order}"] = float(np.mean([distinct_n(s.tokens, order) for s in samples]))
    out["distinct_correct"] = float(
        np.mean(
            [
                len({_normalise(t) for t, ok in zip(tx, c, strict=True) if ok})
                for tx, c in zip(texts, correct, strict=True)
            ]
        )
    )
    out["correct_rate"] = float(np.mean([np.mean(c) for c in correct]))
    out["mean_length"] = tokens / sum(len(s.counts) for s in samples)
    out["eos_rate"] = float(np.mean([np.mean(s.finished) for s in samples]))
    out["prompts"] = n_prompts
    return out


# ---------------------------------------------------------------------------------------------- the job


@dataclasses.dataclass
class EvalSettings:
    temperatures: list[float]
    ks: list[int]
    n: int = 32
    max_new_tokens: int = 128
    seed: int = 0
    prompts_per_batch: int = 8
    checker: str = "exact"
    chat_template: str = ""

    def check(self) -> None:
        if self.n < 1:
            raise ValueError(f"--num-samples: must be >= 1, got {self.n}")
        if not self.temperatures or any(not (t > 0 and math.isfinite(t)) for t in self.temperatures):
            raise ValueError(f"--temperatures: each must be > 0 (plain sampling), got {self.temperatures}")
        if len({f"{t:g}" for t in self.temperatures}) != len(self.temperatures):
            raise ValueError(f"--temperatures: each at most once, got {self.temperatures}")
        bad = [k for k in self.ks if not 1 <= k <= self.n]
        if not self.ks or bad:
            raise ValueError(f"--k: each k must be in 1..n={self.n} (pass@k needs n >= k), got {self.ks}")
        if self.max_new_tokens < 1 or self.prompts_per_batch < 1:
            raise ValueError("--max-new-tokens and --prompts-per-batch must be >= 1")


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[EvalPrompt],
    settings: EvalSettings,
    *,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    samples_path: str | None = None,
) -> dict[str, Any]:
    """Sample, check and summarise; data-parallel over ranks when a process group exists (each rank
    takes every world_size-th prompt; the results are gathered on every rank). Returns
    {"temperatures": {"<T>": metrics}, "per_prompt": {...}}; with `samples_path`, rank 0 also writes
    every completion as JSONL (prompt id, temperature, text, correct)."""
    settings.check()
    checker, _ = load_checker(settings.checker)
    rank, world = dist.rank(), dist.world_size()
    mine = list(prompts)[rank::world]
    ids = [encode_prompt(tokenizer, p.prompt, settings.chat_template or None) for p in mine]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bar = None
    if show_progress and dist.is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(mine) * len(settings.temperatures), desc=f"sampling (rank 0 of {world})", unit="prompt"
        )
    model.eval()
    local: list[tuple[int, float, PromptSamples, list[str], list[bool]]] = []
    for temperature in settings.temperatures:
        for s in sample_completions(
            model,
            ids,
            [p.index for p in mine],
            n=settings.n,
            temperature=temperature,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            seed=settings.seed,
            prompts_per_batch=settings.prompts_per_batch,
            device=device,
            progress=bar.update if bar is not None else None,
        ):
            record = prompts[s.index].record
            texts = [tokenizer.decode(t, skip_special_tokens=True) for t in s.tokens]
            try:
                correct = [bool(checker(t, record)) for t in texts]
            except Exception as err:  # a checker bug: say on which prompt, keep the cause
                raise ValueError(
                    f"--checker {settings.checker} failed on prompt {prompts[s.index].id!r}: "
                    f"{type(err).__name__}: {err}"
                ) from err
            local.append((s.index, temperature, s, texts, correct))
    if bar is not None:
        bar.close()
    gathered = sorted(
        (item for part in dist.gather_objects(local) for item in part), key=lambda x: (x[1], x[0])
    )

    report: dict[str, Any] = {"temperatures": {}, "per_prompt": {}}
    for temperature in settings.temperatures:
        items = [x for x in gathered if x[1] == temperature]
        report["temperatures"][f"{temperature:g}"] = summarise(
            [x[2] for x in items], [x[4] for x in items], [x[3] for x in items], settings.ks
        )
        report["per_prompt"][f"{temperature:g}"] = {
            prompts[x[0]].id: {"correct": int(sum(x[4])), "n": len(x[4])} for x in items
        }
    if samples_path and dist.is_main_process():
        _write_samples(samples_path, prompts, gathered)
    return report


def _write_samples(path: str, prompts: Sequence[EvalPrompt], gathered) -> None:
    """Every completion as one JSON line, written atomically (a half-written file never has the name)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for index, temperature, s, texts, correct in gathered:
            p = prompts[index]
            for j, (text, ok) in enumerate(zip(texts, correct, strict=True)):
                f.write(
                    json.dumps(
                        {
                            "id": p.id,
                            "prompt": p.prompt,
                            "temperature": temperature,
                            "sample": j,
                            "completion": text,
                            "correct": ok,
                            "finished": s.finished[j],
                        },
                        sort_keys=True,
                    )
                    + "\n"
                )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """MLflow keys: t<T>/<metric>, e.g. t1/pass_at_4 (MLflow names allow no '@')."""
    return {f"t{t}/{k}": v for t, m in report["temperatures"].items() for k, v in m.items()}


def write_report(path: str, report: dict[str, Any], meta: dict[str, Any]) -> None:
    write_json(path, {**meta, **report})


# ---------------------------------------------------------------------------------------------- entry point


def resolve_model_dir(path: str, work_dir: str, base: str = "") -> str:
    """A Hugging Face model directory as is; a training checkpoint (checkpoints/stepN, or a checkpoints root:
    its newest complete one; a LoRA run's: its merged model) exported once by rank 0 to
    work_dir/model-<tag> (hdpo_ds/runtime/export.py); a LoRA adapter directory (adapter_config.json) merged
    once into its base model (``base``, else the adapter's ``base_model_name_or_path``) by rank 0 to
    work_dir/model-adapter-<hash>."""
    from hdpo_ds.runtime import checkpoint, export

    is_adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))
    if base and not is_adapter:
        raise ValueError(f"--base: only with an adapter directory as --model; {path} is not one")
    if is_adapter:
        return _merged_adapter_dir(path, base, work_dir)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if not os.path.isdir(path):
        raise ValueError(f"--model: no such directory {path}")
    try:  # a checkpoint folder, a checkpoints root, or a run's output_dir
        folder = checkpoint.find_resume_checkpoint(path, "auto") or checkpoint.find_resume_checkpoint(
            path, path
        )
    except checkpoint.CheckpointError as err:
        raise ValueError(
            f"--model: {path} is neither a model directory (config.json) nor a checkpoint: {err}"
        ) from err
    out = os.path.join(work_dir, f"model-{os.path.basename(folder.rstrip('/'))}")
    if dist.is_main_process() and not os.path.isfile(os.path.join(out, "config.json")):
        tmp = f"{out}.tmp-{os.getpid()}"
        export.export_hf_from_checkpoint(folder, tmp)
        os.replace(tmp, out)  # a killed export leaves only the .tmp folder, never a half model under `out`
    dist.barrier()
    return out


_WEIGHT_FILES = (".safetensors", ".bin")


def _merged_adapter_dir(adapter: str, base: str, work_dir: str) -> str:
    """The adapter merged into its base (peft's merge_and_unload), written once by rank 0 (aside, then
    renamed), keyed by the adapter's files and the base's path."""
    import hashlib

    with open(os.path.join(adapter, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    base = base or adapter_config.get("base_model_name_or_path") or ""
    if not base:
        raise ValueError(f"--base: {adapter} names no base model (base_model_name_or_path); give --base")
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise ValueError(f"--base: {base} is not a model directory (no config.json)")
    if not any(name.endswith(_WEIGHT_FILES) for name in os.listdir(base)):
        raise ValueError(
            f"--base: {base} holds a config but no weights (a run with model.from_scratch keeps its base "
            "only in its checkpoints: give the checkpoint as --model, it is evaluated merged)"
        )
    digest = hashlib.sha256(os.path.abspath(base).encode())
    for name in sorted(os.listdir(adapter)):
        if name.endswith((".json", *_WEIGHT_FILES)):
            with open(os.path.join(adapter, name), "rb") as f:
                digest.update(name.encode() + f.read())
    out = os.path.join(work_dir, f"model-adapter-{digest.hexdigest()[:16]}")
    if dist.is_main_process() and not os.path.isfile(os.path.join(out, "config.json")):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        tmp = f"{out}.tmp-{os.getpid()}"
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer_dir = adapter if os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        os.replace(tmp, out)
        logger.info("merged the adapter %s into %s -> %s", adapter, base, out)
    dist.barrier()
    return out


def load_for_sampling(model_dir: str, *, device: torch.device, dtype: str = "auto"):
    """(model, tokenizer, dtype name) for sampling: bf16 on GPUs that have it else float32 unless `dtype`
    says otherwise, KV cache on, and the attention `auto` picks for padded rows (runtime/attention.py:
    flash_attention_2 where flash-attn runs this dtype and GPU, else sdpa, or eager for what sdpa does
    not apply, such as Gemma-2's softcapping)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    config = AutoConfig.from_pretrained(model_dir)
    attn = select_attention(
        "auto", device.type, config, packing=False, source=model_dir, dtype=getattr(torch, dtype)
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation=attn
    )
    model.config.use_cache = True
    return model.to(device).eval(), tokenizer, dtype, attn


def run_evaluation(
    model_path: str,
    prompts_spec: str,
    settings: EvalSettings,
    *,
    out_path: str,
    samples_path: str | None = None,
    limit: int = 0,
    dtype: str = "auto",
    tracking_uri: str = "",
    experiment: str = "hdpo_ds-eval",
    run_name: str = "",
    log_mlflow: bool = True,
    show_progress: bool = True,
    base: str = "",
) -> dict[str, Any]:
    """The whole job on every rank: join the process group (when launched with several), load, sample,
    score; rank 0 writes `out_path` (JSON) and logs params and metrics to one MLflow run."""
    from hdpo_ds.common.versions import package_versions
    from hdpo_ds.runtime import engine
    from hdpo_ds.tracking.mlflow_logger import MlflowLogger, resolve_tracking_uri

    settings.check()
    _, fields = load_checker(settings.checker)
    prompts = load_prompts(prompts_spec, fields, limit=limit)  # bad input fails before any model loads
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        engine.init_distributed()
        device = engine.current_device()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(settings.seed)
    work_dir = os.path.dirname(os.path.abspath(out_path))
    if dist.is_main_process():
        os.makedirs(work_dir, exist_ok=True)
    model_dir = resolve_model_dir(model_path, work_dir, base)
    model, tokenizer, dtype_name, attn = load_for_sampling(model_dir, device=device, dtype=dtype)
    logger.info(
        "sampling %d prompts x %d at T=%s on %d rank(s), %s, %s attention",
        len(prompts),
        settings.n,
        settings.temperatures,
        dist.world_size(),
        dtype_name,
        attn,
    )
    report = evaluate_model(
        model,
        tokenizer,
        prompts,
        settings,
        device=device,
        show_progress=show_progress,
        samples_path=samples_path,
    )
    meta = {
        "model": os.path.abspath(model_path),
        "model_dir": os.path.abspath(model_dir),
        "prompts": prompts_spec,
        "num_prompts": len(prompts),
        "world_size": dist.world_size(),
        "device": device.type,
        "dtype": dtype_name,
        "attn_implementation": attn,
        "settings": dataclasses.asdict(settings),
        "versions": package_versions(),
    }
    if dist.is_main_process():
        if log_mlflow:
            uri = resolve_tracking_uri(tracking_uri)
            run = MlflowLogger(uri, experiment, run_name, spool_dir=os.path.join(work_dir, "mlflow_spool"))
            params = {f"eval.{k}": v for k, v in dataclasses.asdict(settings).items()}
            params.update({f"eval.{k}": v for k, v in meta.items() if k not in ("settings", "versions")})
            params.update({f"versions.{k}": v for k, v in meta["versions"].items()})
            run.log_params(params)
            run.log_metrics(flat_metrics(report), step=0)
            meta["mlflow_run_id"], meta["tracking_uri"] = run.run_id, uri
            write_report(out_path, report, meta)
            run.log_artifact(out_path)
            run.finish("FINISHED")
        else:
            write_report(out_path, report, meta)
    dist.barrier()
    return {**meta, **report}
