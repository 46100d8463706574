"""The alpha trade-off of H-DPO at toy scale: SFT -> sampled pairs -> H-DPO per alpha -> pass@k.

    python -m hdpo_ds.examples.toy.reproduce [--seeds 0 1 2] [--alphas 0.8 0.9 1.0 1.1] [--out outputs/toy]
        [--results docs/results.md] [--smoke]

For each seed: (i) generate the arithmetic task (hdpo_ds/examples/toy/arith.py) and train a tiny Llama on it
from scratch with launch/sft.py; (ii) sample completions of the pair prompts from the SFT model with
launch/evaluate.py and build preference pairs by correctness (hdpo_ds/tools/sampled_pairs.py); (iii) train
H-DPO with launch/train.py for every alpha, same beta, steps and seed, the SFT model as reference (its
log-probs cached once per seed and shared); (iv) evaluate the SFT model and every H-DPO model with
launch/evaluate.py: pass@k for k = 1, 2, 4, ..., n at T = 0.5 and 1.0, token entropy, distinct-n, distinct
correct answers (the report in <model run>/eval/report.json, every sample beside it in samples.jsonl). Then
the table, the commands and a plot of pass@k against k go into the results file, between the markers below
(the rest of the file is left alone).

Every stage is skipped when its output exists (a completed HF export, report or pair file), so an
interrupted run continues where it stopped; delete --out to start over. Each stage runs as its own
process, exactly the commands printed in the results. --smoke is a two-minute version for the tests:
small sets, few steps, n = 4, alphas 0.8 and 1.0, one seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

BEGIN, END = "<!-- toy-reproduce:begin -->", "<!-- toy-reproduce:end -->"
# The repository: this file is hdpo_ds/examples/toy/reproduce.py.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


@dataclasses.dataclass
class Study:
    seeds: list[int]
    alphas: list[float]
    sft_train: int = 40000
    sft_eval: int = 500
    pair_prompts: int = 2000
    eval_prompts: int = 200
    sft_steps: int = 400
    sft_batch: int = 128
    pair_samples: int = 8
    pairs_per_prompt: int = 2
    hdpo_steps: int = 150
    hdpo_batch: int = 64
    n: int = 32
    temperatures: tuple[float, ...] = (0.5, 1.0)
    max_new_tokens: int = 64

    @property
    def ks(self) -> list[int]:
        ks, k = [], 1
        while k <= self.n:
            ks.append(k)
            k *= 2
        return ks


def smoke_study() -> Study:
    return Study(
        seeds=[0],
        alphas=[0.8, 1.0],
        sft_train=2000,
        sft_eval=64,
        pair_prompts=256,
        eval_prompts=8,
        sft_steps=150,
        sft_batch=32,
        pair_samples=8,
        hdpo_steps=8,
        hdpo_batch=8,
        n=4,
    )


def _run(cmd: list[str], log_path: str, commands: list[str], done: bool = False) -> None:
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


def run_seed(study: Study, seed: int, out: str, tracking_uri: str, commands: list[str]) -> dict:
    """All stages of one seed; returns {model name: evaluation report}."""
    from hdpo_ds.examples.toy.arith import write_task

    py = sys.executable
    base = os.path.join(out, f"seed{seed}")
    task, sft, pairs = (os.path.join(base, d) for d in ("task", "sft", "pairs"))
    logs = os.path.join(base, "logs")
    os.makedirs(logs, exist_ok=True)
    mlflow = [f"logging.tracking_uri={tracking_uri}"]
    if not os.path.isfile(os.path.join(task, "eval_prompts.jsonl")):
        write_task(
            task,
            seed,
            sft_train=study.sft_train,
            sft_eval=study.sft_eval,
            pair_prompts=study.pair_prompts,
            eval_prompts=study.eval_prompts,
        )
    commands.append(
        f"python -m hdpo_ds.examples.toy.arith --out {task} --seed {seed} --sft-train {study.sft_train} "
        f"--sft-eval {study.sft_eval} --pair-prompts {study.pair_prompts} --eval-prompts {study.eval_prompts}"
    )
    _run(
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
            f"train.max_steps={study.sft_steps}",
            f"train.pairs_per_step={study.sft_batch}",
            *mlflow,
        ],
        os.path.join(logs, "sft.log"),
        commands,
        done=os.path.isfile(os.path.join(sft, "hf", "config.json")),
    )
    pairs_done = os.path.isfile(os.path.join(pairs, "train.jsonl"))
    _run(
        [
            py,
            "launch/evaluate.py",
            "--model",
            f"{sft}/hf",
            "--prompts",
            f"{task}/pair_prompts.jsonl",
            "--checker",
            "arith",
            "--temperatures",
            "1.0",
            "--num-samples",
            str(study.pair_samples),
            "--k",
            "1",
            "--max-new-tokens",
            str(study.max_new_tokens),
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
        os.path.join(logs, "sample_pairs.log"),
        commands,
        done=pairs_done,
    )
    _run(
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
            str(study.pairs_per_prompt),
            "--seed",
            str(seed),
        ],
        os.path.join(logs, "pairs.log"),
        commands,
        done=pairs_done,
    )
    models = {"SFT": f"{sft}/hf"}
    for alpha in study.alphas:
        run_dir = os.path.join(base, f"hdpo_alpha{alpha:g}")
        models[f"alpha={alpha:g}"] = f"{run_dir}/hf"
        _run(
            [
                py,
                "launch/train.py",
                "--ds",
                "ds_configs/zero3.json",
                "--config",
                "configs/toy/hdpo.yaml",
                f"output_dir={run_dir}",
                f"model.name_or_path={sft}/hf",
                f"reference.cache_path={base}/reference_cache",
                f"data.train_files=[{pairs}/train.jsonl]",
                f"train.pairs_per_step={study.hdpo_batch}",
                f"data.eval_files=[{pairs}/eval.jsonl]"
                if _pair_counts(pairs)["eval_pairs"]
                else "data.eval_files=[]",
                f"loss.alpha={alpha}",
                f"train.seed={seed}",
                f"train.max_steps={study.hdpo_steps}",
                f"optim.warmup_steps={min(10, study.hdpo_steps // 4)}",
                f"train.eval_every={max(1, study.hdpo_steps // 3)}",
                f"logging.run_name=toy-seed{seed}-alpha{alpha:g}",
                *mlflow,
            ],
            os.path.join(logs, f"hdpo_alpha{alpha:g}.log"),
            commands,
            done=os.path.isfile(os.path.join(run_dir, "hf", "config.json")),
        )
    reports = {}
    for name, model in models.items():
        report = os.path.join(os.path.dirname(model), "eval", "report.json")
        samples = os.path.join(os.path.dirname(report), "samples.jsonl")
        _run(
            [
                py,
                "launch/evaluate.py",
                "--model",
                model,
                "--prompts",
                f"{task}/eval_prompts.jsonl",
                "--checker",
                "arith",
                "--temperatures",
                *map(str, study.temperatures),
                "--k",
                *map(str, study.ks),
                "--num-samples",
                str(study.n),
                "--max-new-tokens",
                str(study.max_new_tokens),
                "--seed",
                str(seed),
                "--prompts-per-batch",
                "16",
                "--out",
                report,
                "--samples",
                samples,
                "--tracking-uri",
                tracking_uri,
                "--experiment",
                "hdpo_ds-toy-eval",
                "--run-name",
                f"toy-seed{seed}-{name}",
                "--no-progress",
            ],
            os.path.join(logs, f"eval_{name.replace('=', '')}.log"),
            commands,
            done=os.path.isfile(report),
        )
        with open(report) as f:
            reports[name] = json.load(f)
    with open(os.path.join(pairs, "sampling.json")) as f:
        sampling = json.load(f)
    reports["_pairs"] = {
        "sft_correct_rate_t1": sampling["temperatures"]["1"]["correct_rate"],
        "counts": _pair_counts(pairs),
    }
    return reports


def _pair_counts(pairs_dir: str) -> dict:
    with open(os.path.join(pairs_dir, "train.jsonl")) as f:
        train = sum(1 for _ in f)
    with open(os.path.join(pairs_dir, "eval.jsonl")) as f:
        evaluation = sum(1 for _ in f)
    return {"train_pairs": train, "eval_pairs": evaluation}


# ---------------------------------------------------------------------------------------------- report


def _fmt(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def entropy_order(per_seed: dict[int, dict], alphas: list[float], temperature: str = "1") -> dict[int, bool]:
    """Per seed: does the sample entropy at T rise strictly with alpha (the paper's prediction)?"""
    verdict = {}
    for seed, reports in per_seed.items():
        entropies = [
            reports[f"alpha={a:g}"]["temperatures"][temperature]["token_entropy"] for a in sorted(alphas)
        ]
        verdict[seed] = all(x < y for x, y in itertools.pairwise(entropies))
    return verdict


def render_markdown(
    study: Study, per_seed: dict[int, dict], commands: list[str], plot_rel: str, elapsed_s: float
) -> str:
    names = ["SFT"] + [f"alpha={a:g}" for a in study.alphas]
    ks_shown = [k for k in (1, 4, 16) if k <= study.n]
    lines = [BEGIN, "", "## Toy reproduction: the alpha trade-off (`make reproduce`)", ""]
    lines += [
        "Written by `python -m hdpo_ds.examples.toy.reproduce` (see its docstring for the stages); do not "
        "edit by hand between the markers.",
        "",
        f"Seeds {study.seeds}; alphas {study.alphas}; beta 0.1 and {study.hdpo_steps} H-DPO steps of "
        f"{study.hdpo_batch} pairs for every alpha (configs/toy/hdpo.yaml); SFT {study.sft_steps} steps of "
        f"{study.sft_batch} sequences (configs/toy/sft.yaml); {study.eval_prompts} held-out prompts, "
        f"n = {study.n} samples per prompt and temperature, plain temperature sampling, at most "
        f"{study.max_new_tokens} new tokens. Wall time {elapsed_s / 60:.0f} min on this machine.",
        "",
    ]
    for t in [f"{x:g}" for x in study.temperatures][::-1]:
        lines += [f"### T = {t}: per seed", ""]
        header = (
            ["seed", "model", "entropy (nats/token)"]
            + [f"pass@{k}" for k in ks_shown]
            + ["distinct-4", "distinct correct", "mean length"]
        )
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for seed, reports in per_seed.items():
            for name in names:
                m = reports[name]["temperatures"][t]
                row = (
                    [str(seed), name, f"{m['token_entropy']:.3f}"]
                    + [f"{m[f'pass_at_{k}']:.3f}" for k in ks_shown]
                    + [f"{m['distinct_4']:.3f}", f"{m['distinct_correct']:.2f}", f"{m['mean_length']:.1f}"]
                )
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if len(per_seed) > 1:
            lines += [f"### T = {t}: mean ± standard deviation over {len(per_seed)} seeds", ""]
            header = (
                ["model", "entropy"] + [f"pass@{k}" for k in ks_shown] + ["distinct-4", "distinct correct"]
            )
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for name in names:
                col = [r[name]["temperatures"][t] for r in per_seed.values()]
                row = (
                    [name, _fmt([m["token_entropy"] for m in col])]
                    + [_fmt([m[f"pass_at_{k}"] for m in col]) for k in ks_shown]
                    + [_fmt([m["distinct_4"] for m in col]), _fmt([m["distinct_correct"] for m in col], 2)]
                )
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    order = entropy_order(per_seed, study.alphas)
    agree = sum(order.values())
    per_seed_verdict = ", ".join(f"seed {s}: {'yes' if ok else 'no'}" for s, ok in order.items())
    lines += [
        "### Does the entropy fall as alpha falls?",
        "",
        f"The paper predicts that the sample entropy falls as alpha falls. At T = 1 it rises strictly with "
        f"alpha in {agree} of {len(order)} seed(s) "
        f"({per_seed_verdict}).",
        "",
        "Pairs per seed (built from the SFT model's samples at T = 1): "
        + "; ".join(
            f"seed {s}: SFT correct rate {r['_pairs']['sft_correct_rate_t1']:.3f}, "
            f"{r['_pairs']['counts']['train_pairs']} train / {r['_pairs']['counts']['eval_pairs']} eval pairs"
            for s, r in per_seed.items()
        )
        + ".",
        "",
        f"![pass@k against k per alpha]({plot_rel})",
        "",
        "Commands (run from the repository root, in this order):",
        "",
        "```bash",
        *commands,
        "```",
        "",
        END,
    ]
    return "\n".join(lines)


def plot(study: Study, per_seed: dict[int, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["SFT"] + [f"alpha={a:g}" for a in study.alphas]
    temps = [f"{x:g}" for x in study.temperatures]
    fig, axes = plt.subplots(1, len(temps), figsize=(5.5 * len(temps), 4.2), squeeze=False)
    for ax, t in zip(axes[0], temps, strict=True):
        for name in names:
            values = np.array(
                [[r[name]["temperatures"][t][f"pass_at_{k}"] for k in study.ks] for r in per_seed.values()]
            )
            mean = values.mean(axis=0)
            style = {"linestyle": "--", "color": "black"} if name == "SFT" else {}
            ax.plot(study.ks, mean, marker="o", label=name, **style)
            if len(values) > 1:
                ax.fill_between(
                    study.ks,
                    values.min(axis=0),
                    values.max(axis=0),
                    alpha=0.15,
                    **({"color": "black"} if name == "SFT" else {}),
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.set_title(f"T = {t} (mean over seeds {study.seeds}; band: min-max)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_section(results_path: str, section: str) -> None:
    """Replace the text between the markers (or append it) and write the file atomically."""
    from hdpo_ds.common.atomic import write_text

    text = "# Results\n"
    if os.path.isfile(results_path):
        with open(results_path) as f:
            text = f.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text(results_path, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.8, 0.9, 1.0, 1.1])
    parser.add_argument("--out", default="outputs/toy")
    parser.add_argument(
        "--results", default="docs/results.md", help="the markdown file to write the section into"
    )
    parser.add_argument("--plot", default="docs/img/toy-passk.png")
    parser.add_argument("--tracking-uri", default="", help="default: sqlite:///<out>/mlflow.db")
    parser.add_argument("--smoke", action="store_true", help="the two-minute version (tests)")
    args = parser.parse_args(argv)
    study = smoke_study() if args.smoke else Study(seeds=args.seeds, alphas=args.alphas)
    if args.smoke and "--seeds" in (argv or sys.argv):
        study.seeds = args.seeds
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    tracking_uri = args.tracking_uri or f"sqlite:///{os.path.join(out, 'mlflow.db')}"
    started = time.time()
    commands: list[str] = []
    per_seed = {seed: run_seed(study, seed, out, tracking_uri, commands) for seed in study.seeds}
    elapsed = time.time() - started
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {
                "study": dataclasses.asdict(study),
                "elapsed_s": elapsed,
                "results": {str(s): {k: v for k, v in r.items()} for s, r in per_seed.items()},
            },
            f,
            indent=1,
        )
    plot(study, per_seed, args.plot)
    plot_rel = os.path.relpath(os.path.abspath(args.plot), os.path.dirname(os.path.abspath(args.results)))
    shown_out = os.path.relpath(out, ROOT) if out.startswith(ROOT + os.sep) else out
    section = render_markdown(
        study, per_seed, [c.replace(out, shown_out) for c in commands], plot_rel, elapsed
    )
    write_section(args.results, section)
    print(f"wrote {args.results} and {args.plot} ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
