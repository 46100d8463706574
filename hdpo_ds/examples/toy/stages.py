"""The toy pipeline's stages, shared by the frozen search (search.py) and the study (reproduce.py).

Each stage runs as its own process (launch/sft.py, launch/evaluate.py, launch/train.py, the pair tool)
and is skipped when its output exists (a completed HF export, report or pair file), so an interrupted run
continues where it stopped. Every command is recorded, run or skipped, so that the results list them all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time

# The repository: this file is hdpo_ds/examples/toy/stages.py.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SETTING_FILE = os.path.join(ROOT, "configs", "toy", "search.json")


@dataclasses.dataclass
class Sizes:
    """The task, SFT and sampling sizes of one seed (the same for the search and the study)."""

    sft_train: int = 40000
    sft_eval: int = 500
    pair_prompts: int = 2000
    eval_prompts: int = 200
    val_prompts: int = 200
    sft_steps: int = 400
    sft_batch: int = 128
    pair_samples: int = 8
    pairs_per_prompt: int = 2
    hdpo_batch: int = 64
    max_new_tokens: int = 64


def smoke_sizes() -> Sizes:
    return Sizes(
        sft_train=2000,
        sft_eval=64,
        pair_prompts=192,
        eval_prompts=8,
        val_prompts=8,
        sft_steps=110,
        sft_batch=16,
        hdpo_batch=8,
    )


@dataclasses.dataclass(frozen=True)
class Setting:
    """One preference-training setting; `epochs` over the seed's train pairs sets the step count."""

    lr: float
    epochs: int
    nll_weight: float
    beta: float = 0.1

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}-ep{self.epochs}-nll{self.nll_weight:g}-beta{self.beta:g}"

    def steps(self, train_pairs: int, batch: int) -> int:
        return self.epochs * math.ceil(train_pairs / batch)

    def overrides(self, train_pairs: int, batch: int) -> list[str]:
        steps = self.steps(train_pairs, batch)
        return [
            f"optim.lr={self.lr}",
            f"loss.beta={self.beta}",
            f"loss.nll_weight={self.nll_weight}",
            f"train.max_steps={steps}",
            f"optim.warmup_steps={min(10, steps // 4)}",
        ]


def load_setting(path: str = SETTING_FILE) -> Setting:
    """The setting the frozen search chose (`make reproduce-search` writes it; committed)."""
    try:
        with open(path) as f:
            chosen = json.load(f)["chosen"]
        return Setting(**chosen)
    except FileNotFoundError:
        raise SystemExit(f"{path}: no frozen setting; run `make reproduce-search` first") from None
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(
            f"{path}: field 'chosen' is not a setting (lr, epochs, nll_weight, beta): {e}"
        ) from e


@dataclasses.dataclass
class SeedRun:
    """Where one seed's stages write: the task, the SFT model, the pairs, logs, the shared reference."""

    seed: int
    base: str
    tracking_uri: str
    commands: list[str]

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    @property
    def task(self) -> str:
        return self.path("task")

    @property
    def sft_model(self) -> str:
        return self.path("sft", "hf")

    @property
    def pairs(self) -> str:
        return self.path("pairs")

    def log(self, name: str) -> str:
        path = self.path("logs", f"{name}.log")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def pair_counts(self) -> dict:
        counts = {}
        for split in ("train", "eval"):
            with open(os.path.join(self.pairs, f"{split}.jsonl")) as f:
                counts[f"{split}_pairs"] = sum(1 for _ in f)
        return counts


def run_stage(cmd: list[str], log_path: str, commands: list[str], done: bool = False) -> None:
    """Run one stage as its own process unless `done` (its output exists); its output goes to log_path;
    a failure stops everything. The command is recorded either way (the results list every command)."""
    shown = " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")
    commands.append(shown)
    if done:
        return
    print(f"$ {shown}", flush=True)
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-30:])
        raise SystemExit(f"stage failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    print(f"  done in {time.time() - started:.0f} s", flush=True)


def prepare_seed(sizes: Sizes, run: SeedRun) -> None:
    """The task, the SFT model trained from scratch on it, and preference pairs by correctness from the
    SFT model's samples of the pair prompts (8 per prompt at T = 1; correct = chosen)."""
    from hdpo_ds.examples.toy.arith import write_task

    py, task, seed = sys.executable, run.task, run.seed
    set_sizes = {
        "sft_train": sizes.sft_train,
        "sft_eval": sizes.sft_eval,
        "pair_prompts": sizes.pair_prompts,
        "eval_prompts": sizes.eval_prompts,
        "val_prompts": sizes.val_prompts,
    }
    if not os.path.isfile(os.path.join(task, "val_prompts.jsonl")):
        write_task(task, seed, **set_sizes)
    run.commands.append(
        f"python -m hdpo_ds.examples.toy.arith --out {task} --seed {seed} "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in set_sizes.items())
    )
    sft = run.path("sft")
    run_stage(
        [
            py,
            "launch/sft.py",
            "--ds",
            "ds_configs/zero3.json",
            "--config",
            "configs/toy/sft.yaml",
            f"output_dir={sft}",
            f"model.name_or_path={task}",
            f"data.train_files=[{task}/sft_train.jsonl]",
            f"data.eval_files=[{task}/sft_eval.jsonl]",
            f"train.seed={seed}",
            f"train.max_steps={sizes.sft_steps}",
            f"train.pairs_per_step={sizes.sft_batch}",
            f"logging.tracking_uri={run.tracking_uri}",
        ],
        run.log("sft"),
        run.commands,
        done=os.path.isfile(os.path.join(sft, "hf", "config.json")),
    )
    pairs = run.pairs
    pairs_done = os.path.isfile(os.path.join(pairs, "train.jsonl"))
    run_stage(
        [
            py,
            "launch/evaluate.py",
            "--model",
            run.sft_model,
            "--prompts",
            f"{task}/pair_prompts.jsonl",
            "--checker",
            "arith",
            "--temperatures",
            "1.0",
            "--num-samples",
            str(sizes.pair_samples),
            "--k",
            "1",
            "--max-new-tokens",
            str(sizes.max_new_tokens),
            "--seed",
            str(seed + 1000),
            "--prompts-per-batch",
            "32",
            "--samples",
            f"{pairs}/samples.jsonl",
            "--out",
            f"{pairs}/sampling.json",
            "--no-mlflow",
            "--no-progress",
        ],
        run.log("sample_pairs"),
        run.commands,
        done=pairs_done,
    )
    run_stage(
        [
            py,
            "-m",
            "hdpo_ds.tools.sampled_pairs",
            "--samples",
            f"{pairs}/samples.jsonl",
            "--train",
            f"{pairs}/train.jsonl",
            "--eval",
            f"{pairs}/eval.jsonl",
            "--eval-fraction",
            "0.05",
            "--pairs-per-prompt",
            str(sizes.pairs_per_prompt),
            "--seed",
            str(seed),
        ],
        run.log("pairs"),
        run.commands,
        done=pairs_done,
    )


def train_preference(
    sizes: Sizes,
    run: SeedRun,
    setting: Setting,
    alpha: float,
    name: str,
    *,
    eval_every: int | None = None,
    extra: tuple[str, ...] = (),
) -> str:
    """H-DPO (configs/toy/hdpo.yaml) from the SFT model with `setting` and `alpha`, the SFT model as the
    reference (its log-probs cached once per seed, shared by every run), evaluated on the eval pairs every
    `eval_every` steps (default: 3 times; 0: at the end only); returns the run's output_dir."""
    counts = run.pair_counts()
    out = run.path(name)
    steps = setting.steps(counts["train_pairs"], sizes.hdpo_batch)
    run_stage(
        [
            sys.executable,
            "launch/train.py",
            "--ds",
            "ds_configs/zero3.json",
            "--config",
            "configs/toy/hdpo.yaml",
            f"output_dir={out}",
            f"model.name_or_path={run.sft_model}",
            f"reference.cache_path={run.path('reference_cache')}",
            f"data.train_files=[{run.pairs}/train.jsonl]",
            f"data.eval_files=[{run.pairs}/eval.jsonl]" if counts["eval_pairs"] else "data.eval_files=[]",
            f"train.pairs_per_step={sizes.hdpo_batch}",
            *setting.overrides(counts["train_pairs"], sizes.hdpo_batch),
            f"loss.alpha={alpha}",
            f"train.seed={run.seed}",
            f"train.eval_every={max(1, steps // 3) if eval_every is None else eval_every}",
            f"logging.run_name=toy-seed{run.seed}-{name}",
            f"logging.tracking_uri={run.tracking_uri}",
            *extra,
        ],
        run.log(name),
        run.commands,
        done=os.path.isfile(os.path.join(out, "hf", "config.json")),
    )
    return out


def evaluate(
    sizes: Sizes,
    run: SeedRun,
    model: str,
    prompts: str,
    report: str,
    *,
    temperatures: list[float],
    ks: list[int],
    n: int,
    name: str,
    mlflow: bool = True,
) -> dict:
    """pass@k, entropy, distinct-n and distinct correct answers of `model` on `prompts` (launch/evaluate.py;
    every sample beside the report); returns the report."""
    logged = (
        ["--tracking-uri", run.tracking_uri, "--experiment", "hdpo_ds-toy-eval", "--run-name", name]
        if mlflow
        else ["--no-mlflow"]
    )
    run_stage(
        [
            sys.executable,
            "launch/evaluate.py",
            "--model",
            model,
            "--prompts",
            prompts,
            "--checker",
            "arith",
            "--temperatures",
            *map(str, temperatures),
            "--k",
            *map(str, ks),
            "--num-samples",
            str(n),
            "--max-new-tokens",
            str(sizes.max_new_tokens),
            "--seed",
            str(run.seed),
            "--prompts-per-batch",
            "16",
            "--out",
            report,
            "--samples",
            os.path.join(os.path.dirname(report), "samples.jsonl"),
            *logged,
            "--no-progress",
        ],
        run.log(f"eval_{name}"),
        run.commands,
        done=os.path.isfile(report),
    )
    with open(report) as f:
        return json.load(f)


def shown_commands(commands: list[str], out: str) -> list[str]:
    """The commands with the output folder relative to the repository when it is inside it."""
    shown_out = os.path.relpath(out, ROOT) if out.startswith(ROOT + os.sep) else out
    return [c.replace(out, shown_out) for c in commands]


def commands_block(heading: str, commands: list[str]) -> list[str]:
    """A results section's closing lines: the heading and every command in a bash block."""
    return [heading, "", "```bash", *commands, "```", ""]


def write_section(results_path: str, section: str, begin: str, end: str, *, top: bool = False) -> None:
    """Replace the text between the markers, or add it (after the title line when `top`, else at the
    end), and write the file atomically."""
    from hdpo_ds.common.atomic import write_text

    text = "# Results\n"
    if os.path.isfile(results_path):
        with open(results_path) as f:
            text = f.read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    elif top:
        title, _, body = text.partition("\n")
        text = f"{title}\n\n{section}\n\n{body.lstrip(chr(10))}"
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text(results_path, text)
