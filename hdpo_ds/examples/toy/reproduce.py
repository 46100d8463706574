"""H-DPO's alpha at toy scale, with the setting frozen by the search (`make reproduce`).

    python -m hdpo_ds.examples.toy.reproduce [--seeds 0 1 2] [--alphas 0.8 0.9 0.95 1.0 1.1]
        [--out outputs/toy] [--setting configs/toy/search.json] [--results docs/results.md] [--smoke]

Per seed: the task, an SFT model trained from scratch and preference pairs sampled from it (stages.py);
then H-DPO for every alpha with the one setting `make reproduce-search` chose on validation prompts
(configs/toy/search.json: lr, epochs, NLL weight, beta; nothing here is tuned on the evaluation
prompts), and, where that setting has an NLL term, the control "NLL only": the same run with the H-DPO
term's weight 0 (`loss.type: [hdpo, sft]`, `loss.weights: [0, nll_weight]`), which tells what the
preference term adds beyond training on the chosen responses; then the evaluation of the SFT model, the
control and every H-DPO model on the held-out evaluation prompts: pass@k for k = 1..n at T = 0.5 and 1,
token entropy, distinct-n and distinct correct answers (report.json and every sample in samples.jsonl
beside it). The report: mean ± sd over seeds; per alpha against alpha = 1 (and DPO against SFT and
against the control), the paired difference over prompts with a bootstrap confidence interval; the
paper's claims, each marked; a plot of pass@k against k. Then the monitors against a real metric: one
DPO run of seed 0 trained for TRAJECTORY_EPOCHS epochs, a checkpoint at every evaluation, each
checkpoint's held-out pass@1 beside the detectors' series and alerts, in one figure.

Every stage is skipped when its output exists, so an interrupted run continues where it stopped; delete
--out to start over. --smoke is the short version for the tests (small sets, few steps, n = 4, alphas 0.9
and 1.0, one seed, no control, a 2-evaluation trajectory), with the setting given by --setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import json
import math
import os
import re
import sys
import time

import numpy as np

from hdpo_ds.examples.toy.stages import (
    ROOT,
    SETTING_FILE,
    SeedRun,
    Setting,
    Sizes,
    commands_block,
    evaluate,
    load_setting,
    prepare_seed,
    shown_commands,
    smoke_sizes,
    train_preference,
    write_section,
)

BEGIN, END = "<!-- toy-reproduce:begin -->", "<!-- toy-reproduce:end -->"
VERDICT_BEGIN, VERDICT_END = "<!-- toy-verdict:begin -->", "<!-- toy-verdict:end -->"
BOOTSTRAP_SAMPLES = 2000
# A difference whose whole 95% interval lies within this of 0 is called no effect ("does not hold").
NULL_BAND = 0.01
TRAJECTORY_EPOCHS, TRAJECTORY_EVALS, TRAJECTORY_SAMPLES = 8, 16, 8
CONTROL = "NLL only"
LINE_STYLES = {"SFT": {"linestyle": "--", "color": "black"}, CONTROL: {"linestyle": ":", "color": "gray"}}


@dataclasses.dataclass
class Study:
    seeds: list[int]
    alphas: list[float]
    setting: Setting
    sizes: Sizes = dataclasses.field(default_factory=Sizes)
    n: int = 32
    temperatures: tuple[float, ...] = (0.5, 1.0)
    trajectory_epochs: int = TRAJECTORY_EPOCHS
    trajectory_evals: int = TRAJECTORY_EVALS
    trajectory_samples: int = TRAJECTORY_SAMPLES
    control: bool = True

    @property
    def ks(self) -> list[int]:
        return list(range(1, self.n + 1))

    @property
    def has_control(self) -> bool:
        """Without an NLL term in the setting there is nothing for the control to isolate."""
        return self.control and self.setting.nll_weight > 0

    @property
    def names(self) -> list[str]:
        return ["SFT", *([CONTROL] if self.has_control else []), *(model_name(a) for a in self.alphas)]


def model_name(alpha: float) -> str:
    return f"alpha={alpha:g}"


def smoke_study(setting: Setting) -> Study:
    return Study(
        seeds=[0],
        alphas=[0.9, 1.0],
        setting=setting,
        sizes=smoke_sizes(),
        n=4,
        trajectory_epochs=2,
        trajectory_evals=2,
        trajectory_samples=4,
        control=False,  # keeps the smoke short; tests/test_reproduce.py checks the control's parts alone
    )


# ---------------------------------------------------------------------------------------------- stages


def control_overrides(setting: Setting) -> tuple[str, ...]:
    """The NLL-only control, given after the setting's overrides: the sft term carries the NLL weight, the
    H-DPO term is logged at weight 0, and loss.nll_weight goes back to 0 (config.py refuses both)."""
    return ("loss.type=[hdpo,sft]", f"loss.weights=[0,{setting.nll_weight}]", "loss.nll_weight=0")


def run_seed(study: Study, run: SeedRun) -> dict:
    """All stages of one seed; returns {model name: evaluation report, "_pairs": pair statistics}."""
    prepare_seed(study.sizes, run)
    models = {"SFT": run.sft_model}
    if study.has_control:
        control = control_overrides(study.setting)
        models[CONTROL] = os.path.join(
            train_preference(study.sizes, run, study.setting, 1.0, "nll_only", extra=control), "hf"
        )
    for alpha in study.alphas:
        name = f"hdpo_alpha{alpha:g}"
        models[model_name(alpha)] = os.path.join(
            train_preference(study.sizes, run, study.setting, alpha, name), "hf"
        )
    reports = {}
    for name, model in models.items():
        reports[name] = evaluate(
            study.sizes,
            run,
            model,
            os.path.join(run.task, "eval_prompts.jsonl"),
            os.path.join(os.path.dirname(model), "eval", "report.json"),
            temperatures=list(study.temperatures),
            ks=study.ks,
            n=study.n,
            name=f"toy-seed{run.seed}-{name.replace('=', '').replace(' ', '-')}",
        )
    with open(os.path.join(run.pairs, "sampling.json")) as f:
        sampling = json.load(f)
    reports["_pairs"] = {
        "sft_correct_rate_t1": sampling["temperatures"]["1"]["correct_rate"],
        "counts": run.pair_counts(),
    }
    return reports


def run_trajectory(study: Study, run: SeedRun, sft_report: dict) -> dict:
    """One DPO run trained past its best (trajectory_epochs epochs), a checkpoint at every evaluation,
    and each checkpoint's held-out pass@1 at T = 1; beside them the evaluation series the detectors read
    (from the run's MLflow history) and the alerts they raised (run_info.json)."""
    from mlflow.tracking import MlflowClient

    counts = run.pair_counts()
    setting = dataclasses.replace(study.setting, epochs=study.trajectory_epochs)
    steps = setting.steps(counts["train_pairs"], study.sizes.hdpo_batch)
    every = max(1, steps // study.trajectory_evals)
    out = train_preference(
        study.sizes,
        run,
        setting,
        1.0,
        "trajectory_alpha1",
        eval_every=every,
        extra=(f"train.save_every={every}", "train.keep_checkpoints=1000"),
    )
    points = [{"step": 0, "pass_at_1": sft_report["temperatures"]["1"]["pass_at_1"]}]
    for folder in sorted(glob.glob(os.path.join(out, "checkpoints", "step[0-9]*"))):
        if not re.fullmatch(r"step\d{8}", os.path.basename(folder)):
            continue  # a checkpoint being written (its .tmp folder)
        step = int(os.path.basename(folder)[len("step") :])
        report = evaluate(
            study.sizes,
            run,
            folder,
            os.path.join(run.task, "eval_prompts.jsonl"),
            os.path.join(out, "trajectory", f"step{step:08d}", "report.json"),
            temperatures=[1.0],
            ks=[1],
            n=study.trajectory_samples,
            name=f"toy-trajectory-step{step}",
            mlflow=False,
        )
        points.append({"step": step, "pass_at_1": report["temperatures"]["1"]["pass_at_1"]})
    with open(os.path.join(out, "run_info.json")) as f:
        info = json.load(f)
    client = MlflowClient(info["tracking_uri"])
    series = {}
    for key in ("eval/topk_entropy/chosen", "eval/loss", "eval/logps/chosen_mean", "eval/rewards/accuracies"):
        history = client.get_metric_history(info["run_id"], key)
        series[key] = sorted((m.step, m.value) for m in history)
    return {
        "steps": steps,
        "every": every,
        "epochs": study.trajectory_epochs,
        "pass_at_1": points,
        "series": series,
        "alerts": info["alerts"],
        "samples": study.trajectory_samples,
    }


# ---------------------------------------------------------------------------------------------- statistics


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of Chen et al. 2021 (Codex), eq. 1: 1 - C(n - c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def per_prompt(report: dict, temperature: str, k: int) -> dict[str, float]:
    return {i: pass_at_k(x["n"], x["correct"], k) for i, x in report["per_prompt"][temperature].items()}


def paired_difference(
    per_seed: dict[int, dict],
    a: tuple[str, str],
    b: tuple[str, str],
    k: int,
    rng: np.random.Generator,
) -> dict:
    """pass@k of model a[0] at temperature a[1] minus model b[0] at b[1], prompt by prompt (the same
    prompts), averaged over the prompts of a seed and then over seeds. The 95% interval resamples each
    seed's prompts (BOOTSTRAP_SAMPLES times, percentile method): it covers prompt sampling; `seed_sd` is the
    spread of the per-seed differences (training and sampling seeds)."""
    diffs = []
    for reports in per_seed.values():
        x, y = per_prompt(reports[a[0]], a[1], k), per_prompt(reports[b[0]], b[1], k)
        diffs.append(np.array([x[i] - y[i] for i in sorted(x)]))
    boot = np.zeros(BOOTSTRAP_SAMPLES)
    for d in diffs:
        picks = rng.integers(0, len(d), size=(BOOTSTRAP_SAMPLES, len(d)))
        boot += d[picks].mean(axis=1) / len(diffs)
    seed_means = [float(d.mean()) for d in diffs]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "mean": float(np.mean(seed_means)),
        "ci": [float(lo), float(hi)],
        "seed_means": seed_means,
        "seed_sd": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else 0.0,
    }


def verdict(diff: dict, threshold: float = 0.0) -> str:
    """holds: the interval lies above `threshold`; does not hold: below it, or (threshold 0) within
    NULL_BAND of 0 on both sides; inconclusive otherwise."""
    lo, hi = diff["ci"]
    if lo > threshold and not (threshold == 0.0 and hi < NULL_BAND):
        return "holds"
    if hi < threshold or (threshold == 0.0 and lo > -NULL_BAND and hi < NULL_BAND):
        return "does not hold"
    return "inconclusive"


def summary_stats(study: Study, per_seed: dict[int, dict]) -> dict:
    """Every paired comparison the report shows, and the bar: DPO against SFT at T = 1."""
    rng = np.random.default_rng(0)
    big_k = study.n
    out: dict = {"vs_dpo": {}, "dpo_vs_sft": {}, "dpo_vs_control": {}, "claims": []}
    for t in [f"{x:g}" for x in study.temperatures]:
        out["dpo_vs_sft"][t] = paired_difference(per_seed, ("alpha=1", t), ("SFT", t), 1, rng)
        if study.has_control:
            out["dpo_vs_control"][t] = paired_difference(per_seed, ("alpha=1", t), (CONTROL, t), 1, rng)
        for alpha in study.alphas:
            if alpha == 1.0:
                continue
            name = model_name(alpha)
            out["vs_dpo"][f"{name} T={t}"] = {
                k: paired_difference(per_seed, (name, t), ("alpha=1", t), k, rng) for k in (1, big_k)
            }
    sft_t1 = [r["SFT"]["temperatures"]["1"]["pass_at_1"] for r in per_seed.values()]
    dpo_t1 = [r["alpha=1"]["temperatures"]["1"]["pass_at_1"] for r in per_seed.values()]
    spread = max(np.std(sft_t1, ddof=1), np.std(dpo_t1, ddof=1)) if len(per_seed) > 1 else 0.0
    gain = out["dpo_vs_sft"]["1"]
    out["bar"] = {
        "gain": gain["mean"],
        "ci": gain["ci"],
        "spread": float(spread),
        "met": bool(gain["mean"] > spread and gain["ci"][0] > 0),
    }
    claims = out["claims"]
    for alpha in (a for a in study.alphas if 0.9 <= a < 1.0):
        for t in ("1", "0.5"):
            d = out["vs_dpo"][f"{model_name(alpha)} T={t}"][1]
            claims.append(
                (
                    "alpha 0.9-0.95 gives a better pass@1 than DPO",
                    f"alpha {alpha:g} - DPO, pass@1, T = {t}",
                    d,
                    verdict(d),
                )
            )
    for alpha in (a for a in study.alphas if a < 1.0):
        d = paired_difference(per_seed, (model_name(alpha), "1"), ("alpha=1", "0.5"), 1, rng)
        claims.append(
            (
                "alpha < 1 at T = 1 comes near DPO at a lower temperature",
                f"alpha {alpha:g} at T = 1 - DPO at T = 0.5, pass@1 (holds: interval above -{NULL_BAND:g})",
                d,
                verdict(d, -NULL_BAND),
            )
        )
    for alpha in (a for a in study.alphas if a > 1.0):
        for t in ("1", "0.5"):
            d = out["vs_dpo"][f"{model_name(alpha)} T={t}"][big_k]
            claims.append(
                (
                    "alpha > 1 gives a better pass@k at large k",
                    f"alpha {alpha:g} - DPO, pass@{big_k}, T = {t}",
                    d,
                    verdict(d),
                )
            )
    return out


def entropy_order(per_seed: dict[int, dict], alphas: list[float], temperature: str = "1") -> dict[int, bool]:
    """Per seed: does the sample entropy at T rise strictly with alpha (the paper's prediction)?"""
    verdicts = {}
    for seed, reports in per_seed.items():
        entropies = [
            reports[model_name(a)]["temperatures"][temperature]["token_entropy"] for a in sorted(alphas)
        ]
        verdicts[seed] = all(x < y for x, y in itertools.pairwise(entropies))
    return verdicts


def trajectory_reading(traj: dict) -> dict:
    """Where the pass@1 peak is, where top-k entropy turned (its detector's first alert, and the raw
    series' maximum), and which came first."""
    points = traj["pass_at_1"]
    peak = max(points, key=lambda p: (p["pass_at_1"], -p["step"]))
    turn_alerts = [a["step"] for a in traj["alerts"] if a["detector"] == "topk_entropy_turn"]
    entropy = traj["series"].get("eval/topk_entropy/chosen", [])
    entropy_max = max(entropy, key=lambda p: p[1])[0] if entropy else None
    alert = turn_alerts[0] if turn_alerts else None
    if alert is None:
        order = "the detector did not fire"
    else:
        order = "before" if alert < peak["step"] else "at" if alert == peak["step"] else "after"
    return {"peak": peak, "turn_alert": alert, "entropy_max_step": entropy_max, "order": order}


# ---------------------------------------------------------------------------------------------- report


def _fmt(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _diff(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def render_verdict(study: Study, stats: dict, traj: dict | None) -> str:
    bar = stats["bar"]
    lines = [VERDICT_BEGIN, "", "**Verdict of the toy study** (`make reproduce`, written by its last run): "]
    lines[-1] += (
        f"DPO {'beats' if bar['met'] else 'does not beat'} its SFT model on held-out pass@1 at T = 1 by "
        f"more than the seed spread ({bar['gain']:+.3f}, 95% interval {bar['ci'][0]:+.3f} to "
        f"{bar['ci'][1]:+.3f}, against a seed sd of {bar['spread']:.3f}; {len(study.seeds)} seed(s)). "
    )
    tally: dict[str, list[str]] = {}
    for claim, _, _, mark in stats["claims"]:
        tally.setdefault(claim, []).append(mark)
    lines[-1] += (
        "Paper claims: " + "; ".join(f"{claim}: {', '.join(marks)}" for claim, marks in tally.items()) + "."
    )
    if stats["dpo_vs_control"]:
        d = stats["dpo_vs_control"]["1"]
        lines[-1] += (
            f" The preference term's own share: DPO minus the same training without it ({CONTROL}), "
            f"pass@1 at T = 1, {d['mean']:+.3f} ({d['ci'][0]:+.3f} to {d['ci'][1]:+.3f})."
        )
    if traj is not None:
        r = trajectory_reading(traj)
        lines[-1] += (
            f" Monitors: on a DPO run trained for {traj['epochs']} epochs, held-out pass@1 peaked at step "
            f"{r['peak']['step']} and the top-k entropy turn detector "
            + (
                f"fired at step {r['turn_alert']} ({r['order']} the peak)."
                if r["turn_alert"] is not None
                else "did not fire."
            )
        )
    lines += ["Details: the toy sections below.", "", VERDICT_END]
    return "\n".join(lines)


def render_markdown(
    study: Study,
    per_seed: dict[int, dict],
    stats: dict,
    traj: dict | None,
    commands: list[str],
    plots: dict[str, str],
    elapsed_s: float,
) -> str:
    s = study.setting
    ks_shown = [k for k in (1, 4, 16, study.n) if k <= study.n]
    lines = [BEGIN, "", "## Toy study, step 2: alpha with the frozen setting (`make reproduce`)", ""]
    lines += [
        "Written by `python -m hdpo_ds.examples.toy.reproduce` (its docstring lists the stages); do not "
        "edit by hand between the markers.",
        "",
        f"Seeds {study.seeds}; alphas {study.alphas}; every H-DPO run: lr {s.lr:g}, {s.epochs} epoch(s), "
        f"NLL weight {s.nll_weight:g}, beta {s.beta:g} (chosen on validation prompts, "
        f"`configs/toy/search.json`), {study.sizes.hdpo_batch} pairs per step (configs/toy/hdpo.yaml); SFT "
        f"{study.sizes.sft_steps} steps of {study.sizes.sft_batch} sequences (configs/toy/sft.yaml); "
        f"{study.sizes.eval_prompts} held-out prompts, n = {study.n} samples per prompt and temperature, "
        f"plain temperature sampling, at most {study.sizes.max_new_tokens} new tokens. Paired differences: "
        f"prompt by prompt, mean over prompts and then seeds, [95% bootstrap interval over prompts, "
        f"{BOOTSTRAP_SAMPLES} resamples]. This invocation took {elapsed_s / 60:.0f} min on this machine "
        "(stages whose outputs existed were reused, not rerun; the README gives the time from scratch).",
        "",
    ]
    bar = stats["bar"]
    lines += [
        "### The bar: does DPO beat SFT?",
        "",
        f"DPO (alpha = 1) minus SFT, pass@1 at T = 1: **{_diff(stats['dpo_vs_sft']['1'])}**, per seed "
        + ", ".join(f"{x:+.3f}" for x in stats["dpo_vs_sft"]["1"]["seed_means"])
        + f"; seed spread (the larger sd of the two models' pass@1 over seeds) {bar['spread']:.3f}. "
        f"At T = 0.5: {_diff(stats['dpo_vs_sft']['0.5'])}. Bar {'met' if bar['met'] else 'not met'}.",
        "",
    ]
    if stats["dpo_vs_control"]:
        lines += [
            f"What the preference term adds: DPO minus {CONTROL} (the same runs with the H-DPO term's weight "
            f"0, so only the NLL weight {s.nll_weight:g} on the chosen responses trains), pass@1 at T = 1: "
            f"**{_diff(stats['dpo_vs_control']['1'])}**, per seed "
            + ", ".join(f"{x:+.3f}" for x in stats["dpo_vs_control"]["1"]["seed_means"])
            + f"; at T = 0.5: {_diff(stats['dpo_vs_control']['0.5'])}.",
            "",
        ]
    for t in [f"{x:g}" for x in study.temperatures][::-1]:
        title = f"mean ± sd over {len(per_seed)} seeds" if len(per_seed) > 1 else f"seed {study.seeds[0]}"
        lines += [f"### T = {t}: {title}", ""]
        header = ["model", "entropy"] + [f"pass@{k}" for k in ks_shown] + ["distinct-4", "distinct correct"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in study.names:
            col = [r[name]["temperatures"][t] for r in per_seed.values()]
            row = (
                [name, _fmt([m["token_entropy"] for m in col])]
                + [_fmt([m[f"pass_at_{k}"] for m in col]) for k in ks_shown]
                + [_fmt([m["distinct_4"] for m in col]), _fmt([m["distinct_correct"] for m in col], 2)]
            )
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"Against DPO (alpha = 1) at T = {t}, paired:", ""]
        lines += [f"| model | pass@1 | pass@{study.n} |", "|---|---|---|"]
        for alpha in (a for a in study.alphas if a != 1.0):
            d = stats["vs_dpo"][f"{model_name(alpha)} T={t}"]
            lines.append(f"| {model_name(alpha)} | {_diff(d[1])} | {_diff(d[study.n])} |")
        lines.append("")
    lines += [
        "### The paper's claims at this scale",
        "",
        f"holds: the 95% interval lies above 0 (or the stated threshold); does not hold: it lies below, or "
        f"entirely within ±{NULL_BAND:g} of 0; inconclusive: otherwise.",
        "",
        "| claim | comparison | difference [95% interval] | per seed | verdict |",
        "|---|---|---|---|---|",
    ]
    for claim, comparison, d, mark in stats["claims"]:
        per = ", ".join(f"{x:+.3f}" for x in d["seed_means"])
        lines.append(f"| {claim} | {comparison} | {_diff(d)} | {per} | **{mark}** |")
    order = entropy_order(per_seed, study.alphas)
    lines += [
        "",
        "Entropy: the paper predicts that the sample entropy falls as alpha falls. At T = 1 it rises "
        f"strictly with alpha in {sum(order.values())} of {len(order)} seed(s) ("
        + ", ".join(f"seed {seed}: {'yes' if ok else 'no'}" for seed, ok in order.items())
        + ").",
        "",
        "Pairs per seed (from the SFT model's samples at T = 1): "
        + "; ".join(
            f"seed {seed}: SFT correct rate {r['_pairs']['sft_correct_rate_t1']:.3f}, "
            f"{r['_pairs']['counts']['train_pairs']} train / {r['_pairs']['counts']['eval_pairs']} eval pairs"
            for seed, r in per_seed.items()
        )
        + ".",
        "",
        f"![pass@k against k per alpha]({plots['passk']})",
        "",
    ]
    if traj is not None:
        r = trajectory_reading(traj)
        lines += [
            "### The monitors against held-out pass@1",
            "",
            f"Seed {study.seeds[0]}, alpha = 1, the frozen setting but {traj['epochs']} epochs "
            f"({traj['steps']} steps), an evaluation and a checkpoint every {traj['every']} steps; each "
            f"checkpoint's pass@1 at T = 1 on the evaluation prompts (n = {traj['samples']}; step 0: the SFT "
            f"model's n = {study.n} estimate). Held-out pass@1 peaks at step **{r['peak']['step']}** "
            f"({r['peak']['pass_at_1']:.3f}); the eval top-k entropy of the chosen responses is highest at "
            f"step {r['entropy_max_step']}; `topk_entropy_turn` "
            + (
                f"fires at step **{r['turn_alert']}**: **{r['order']}** the pass@1 peak."
                if r["turn_alert"] is not None
                else "never fires."
            ),
            "",
            "| detector | first alert (step) |",
            "|---|---|",
        ]
        firsts: dict[str, int] = {}
        for a in traj["alerts"]:
            firsts.setdefault(a["detector"], a["step"])
        lines += [f"| `{name}` | {step} |" for name, step in firsts.items()] or ["| (none) | |"]
        lines += ["", f"![held-out pass@1 and top-k entropy along one DPO run]({plots['trajectory']})", ""]
    lines += [*commands_block("Commands (run from the repository root, in this order):", commands), END]
    return "\n".join(lines)


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_passk(study: Study, per_seed: dict[int, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = [f"{x:g}" for x in study.temperatures]
    fig, axes = plt.subplots(1, len(temps), figsize=(5.5 * len(temps), 4.2), squeeze=False)
    for ax, t in zip(axes[0], temps, strict=True):
        for name in study.names:
            values = np.array(
                [[r[name]["temperatures"][t][f"pass_at_{k}"] for k in study.ks] for r in per_seed.values()]
            )
            style = LINE_STYLES.get(name, {})
            ax.plot(study.ks, values.mean(axis=0), label=name, **style)
            if len(values) > 1:
                color = {"color": "black"} if name == "SFT" else {}
                ax.fill_between(study.ks, values.min(axis=0), values.max(axis=0), alpha=0.12, **color)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.set_title(f"T = {t} (mean over seeds {study.seeds}; band: min-max)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_trajectory(traj: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = trajectory_reading(traj)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    steps = [p["step"] for p in traj["pass_at_1"]]
    ax.plot(steps, [p["pass_at_1"] for p in traj["pass_at_1"]], marker="o", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out pass@1 (T = 1)", color="tab:blue")
    ax.axvline(r["peak"]["step"], color="tab:blue", linestyle=":", label="pass@1 peak")
    entropy = traj["series"].get("eval/topk_entropy/chosen", [])
    if entropy:
        twin = ax.twinx()
        twin.plot([s for s, _ in entropy], [v for _, v in entropy], marker="s", color="tab:red")
        twin.set_ylabel("eval top-k entropy, chosen (bits)", color="tab:red")
    for i, a in enumerate(x for x in traj["alerts"] if x["detector"] == "topk_entropy_turn"):
        ax.axvline(a["step"], color="tab:red", linestyle="--", label="topk_entropy_turn" if i == 0 else None)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    ax.set_title("one DPO run trained past its best: pass@1 against the top-k entropy detector")
    fig.tight_layout()
    _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.8, 0.9, 0.95, 1.0, 1.1])
    parser.add_argument("--out", default="outputs/toy")
    parser.add_argument("--setting", default=SETTING_FILE, help="the frozen search's file (`chosen`)")
    parser.add_argument("--results", default="docs/results.md", help="the markdown file the sections go into")
    parser.add_argument("--plot", default="docs/img/toy-passk.png")
    parser.add_argument("--trajectory-plot", default="docs/img/toy-monitors.png")
    parser.add_argument("--no-trajectory", action="store_true", help="skip the monitors run")
    parser.add_argument("--smoke", action="store_true", help="the short version (tests)")
    args = parser.parse_args(argv)
    setting = load_setting(args.setting)
    if args.smoke:
        study = smoke_study(setting)
    else:
        study = Study(seeds=args.seeds, alphas=args.alphas, setting=setting)
    if 1.0 not in study.alphas:
        parser.error("--alphas: include 1.0 (DPO), the baseline of every paired comparison")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    tracking_uri = f"sqlite:///{os.path.join(out, 'mlflow.db')}"
    started = time.time()
    commands: list[str] = []
    per_seed = {}
    for seed in study.seeds:
        run = SeedRun(seed, os.path.join(out, f"seed{seed}"), tracking_uri, commands)
        per_seed[seed] = run_seed(study, run)
    traj = None
    if not args.no_trajectory:
        run = SeedRun(study.seeds[0], os.path.join(out, f"seed{study.seeds[0]}"), tracking_uri, commands)
        traj = run_trajectory(study, run, per_seed[study.seeds[0]]["SFT"])
    elapsed = time.time() - started
    stats = summary_stats(study, per_seed)
    from hdpo_ds.common.atomic import write_json

    write_json(
        os.path.join(out, "results.json"),
        {
            "study": dataclasses.asdict(study),
            "elapsed_s": elapsed,
            "stats": stats,
            "trajectory": traj,
            "results": {str(s): r for s, r in per_seed.items()},
        },
    )
    results_dir = os.path.dirname(os.path.abspath(args.results))
    plots = {"passk": os.path.relpath(os.path.abspath(args.plot), results_dir)}
    plot_passk(study, per_seed, args.plot)
    if traj is not None:
        plot_trajectory(traj, args.trajectory_plot)
        plots["trajectory"] = os.path.relpath(os.path.abspath(args.trajectory_plot), results_dir)
    section = render_markdown(study, per_seed, stats, traj, shown_commands(commands, out), plots, elapsed)
    write_section(args.results, section, BEGIN, END)
    write_section(args.results, render_verdict(study, stats, traj), VERDICT_BEGIN, VERDICT_END, top=True)
    print(f"wrote {args.results} and its plots ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
