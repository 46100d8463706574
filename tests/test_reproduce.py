"""The toy study end to end, small: the frozen search (hdpo_ds/examples/toy/search.py --smoke: task -> SFT ->
sampled pairs -> two settings scored on validation prompts), then the study with its choice
(reproduce.py --smoke: H-DPO for two alphas -> pass@k report, paired differences, claims, the monitors'
trajectory, markdown and plots); a second run redoes nothing. And the study's statistics by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from tests.run_helpers import ROOT


def test_smoke_search_then_study(tmp_path):
    out, results, plot = tmp_path / "toy", tmp_path / "results.md", tmp_path / "img" / "passk.png"
    setting, traj_plot = tmp_path / "search.json", tmp_path / "img" / "monitors.png"
    results.write_text("# Results\n\nhand-written text that must survive\n")
    common = ["--smoke", "--out", str(out), "--results", str(results)]
    search_cmd = [sys.executable, "-m", "hdpo_ds.examples.toy.search", *common, "--setting", str(setting)]
    proc = subprocess.run(search_cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    found = json.loads(setting.read_text())
    scores = [row["pass_at_1"] for row in found["results"]]
    assert len(scores) == 2 and found["chosen"] == found["results"][scores.index(max(scores))]["setting"]
    assert found["protocol"]["alpha"] == 1.0 and "val_prompts.jsonl" in found["protocol"]["score"]
    # scored on the validation prompts, which share no problem with the evaluation prompts
    task = out / "seed0" / "task"
    val, held_out = (
        [json.loads(x) for x in (task / f).read_text().splitlines()]
        for f in ("val_prompts.jsonl", "eval_prompts.jsonl")
    )
    assert len(val) == 8 and not {x["prompt"] for x in val} & {x["prompt"] for x in held_out}
    val_report = json.loads((out / "seed0" / "search" / "sft" / "val_report.json").read_text())
    assert set(val_report["per_prompt"]["1"]) == {x["id"] for x in val}

    cmd = [
        sys.executable,
        "-m",
        "hdpo_ds.examples.toy.reproduce",
        *common,
        "--setting",
        str(setting),
        "--plot",
        str(plot),
        "--trajectory-plot",
        str(traj_plot),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "launch/sft.py" not in proc.stdout  # the search's SFT model and pairs are reused
    data = json.loads((out / "results.json").read_text())
    reports = data["results"]["0"]
    assert set(reports) == {"SFT", "alpha=0.9", "alpha=1", "_pairs"}  # the smoke has no control
    assert reports["_pairs"]["counts"]["train_pairs"] > 0
    assert data["study"]["setting"] == found["chosen"]  # every alpha trains with the frozen choice
    runs = {"SFT": "sft", "alpha=0.9": "hdpo_alpha0.9", "alpha=1": "hdpo_alpha1"}
    for name in ("SFT", "alpha=0.9", "alpha=1"):
        report = reports[name]
        samples_file = out / "seed0" / runs[name] / "eval" / "samples.jsonl"
        samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
        assert report["settings"]["n"] == 4 and report["settings"]["temperatures"] == [0.5, 1.0]
        for t in ("0.5", "1"):
            m = report["temperatures"][t]
            passes = [m[f"pass_at_{k}"] for k in (1, 2, 4)]
            assert passes == sorted(passes) and 0 <= passes[0] <= 1  # pass@k never falls with k
            assert m["token_entropy"] > 0 and 0 < m["distinct_1"] <= 1
            # pass@k from the samples themselves: per prompt, c correct of n, 1 - C(n - c, k) / C(n, k)
            n, c = {}, {}
            for x in samples:
                if f"{x['temperature']:g}" == t:
                    n[x["id"]] = n.get(x["id"], 0) + 1
                    c[x["id"]] = c.get(x["id"], 0) + x["correct"]
            assert len(n) == 8 and set(n.values()) == {4}
            assert report["per_prompt"][t] == {i: {"correct": c[i], "n": n[i]} for i in n}
            for k in (1, 2, 4):
                expected = np.mean([1 - math.comb(n[i] - c[i], k) / math.comb(n[i], k) for i in n])
                assert m[f"pass_at_{k}"] == pytest.approx(expected, rel=1e-12), (name, t, k)
        # T = 0.5 samples from a sharper distribution than T = 1
        assert (
            report["temperatures"]["0.5"]["token_entropy_sampling"]
            < report["temperatures"]["1"]["token_entropy_sampling"]
        )
    # the two alphas trained different models from the same SFT start
    assert reports["alpha=0.9"]["per_prompt"] != reports["alpha=1"]["per_prompt"] or (
        reports["alpha=0.9"]["temperatures"]["1"]["token_entropy"]
        != reports["alpha=1"]["temperatures"]["1"]["token_entropy"]
    )
    # the paired difference is the difference of the reported pass@1 (same prompts, mean over them)
    stats = data["stats"]
    pass1 = {name: reports[name]["temperatures"]["1"]["pass_at_1"] for name in ("SFT", "alpha=1")}
    gain = stats["dpo_vs_sft"]["1"]
    assert gain["mean"] == pytest.approx(pass1["alpha=1"] - pass1["SFT"], abs=1e-12)
    assert gain["ci"][0] <= gain["mean"] <= gain["ci"][1]
    assert {c[3] for c in stats["claims"]} <= {"holds", "does not hold", "inconclusive"}
    # the monitors' run: a checkpoint per evaluation, each scored; its detectors' series beside it
    traj = data["trajectory"]
    assert [p["step"] for p in traj["pass_at_1"]] == list(range(0, traj["steps"] + 1, traj["every"]))
    evals = [s for s, _ in traj["series"]["eval/topk_entropy/chosen"]]
    assert evals == [p["step"] for p in traj["pass_at_1"]][1:]
    text = results.read_text()
    assert text.startswith("# Results\n\n<!-- toy-verdict:begin -->")  # the verdict comes first
    assert "hand-written text that must survive" in text
    assert text.count("<!-- toy-reproduce:begin -->") == 1 and text.count("<!-- toy-search:begin -->") == 1
    assert "| alpha=0.9 |" in text and "The paper's claims at this scale" in text
    assert "launch/sft.py" in text and "launch/train.py" in text and "topk_entropy_turn" in text
    assert plot.stat().st_size > 10_000 and traj_plot.stat().st_size > 10_000

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ python" not in again.stdout  # every stage's output exists: nothing is run again
    assert results.read_text().count("<!-- toy-reproduce:begin -->") == 1
    assert results.read_text().count("<!-- toy-verdict:begin -->") == 1


def _report(correct: list[int], n: int = 4, temperature: str = "1") -> dict:
    return {"per_prompt": {temperature: {f"p{i}": {"correct": c, "n": n} for i, c in enumerate(correct)}}}


def test_pass_at_k_and_the_paired_difference_by_hand():
    from hdpo_ds.examples.toy.reproduce import paired_difference, pass_at_k

    assert pass_at_k(4, 1, 1) == 0.25 and pass_at_k(4, 1, 2) == 0.5 and pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # C(1, 2) = 0: every pair holds a correct one
    # seed 0: a - b per prompt = (2 - 1) / 4, (4 - 0) / 4, 0 -> mean 5 / 12; seed 1: (0 - 2) / 4 -> -0.5
    per_seed = {
        0: {"a": _report([2, 4, 1]), "b": _report([1, 0, 1])},
        1: {"a": _report([0]), "b": _report([2])},
    }
    d = paired_difference(per_seed, ("a", "1"), ("b", "1"), 1, np.random.default_rng(0))
    assert d["seed_means"] == pytest.approx([5 / 12, -0.5])
    assert d["mean"] == pytest.approx((5 / 12 - 0.5) / 2)
    assert d["seed_sd"] == pytest.approx(np.std([5 / 12, -0.5], ddof=1))
    # seed 1 has one prompt (no spread); seed 0's resampled means lie in [0, 1]: the interval is in
    # [(0 - 0.5) / 2, (1 - 0.5) / 2]
    assert -0.25 <= d["ci"][0] < d["mean"] < d["ci"][1] <= 0.25


def test_verdicts_follow_the_interval():
    from hdpo_ds.examples.toy.reproduce import verdict

    assert verdict({"ci": [0.02, 0.05]}) == "holds"
    assert verdict({"ci": [-0.05, -0.02]}) == "does not hold"
    assert verdict({"ci": [-0.005, 0.008]}) == "does not hold"  # a tight null
    assert verdict({"ci": [-0.02, 0.05]}) == "inconclusive"
    assert verdict({"ci": [0.001, 0.009]}) == "does not hold"  # above 0, but no effect that matters
    assert verdict({"ci": [-0.008, 0.03]}, -0.01) == "holds"  # "near": at most 0.01 worse
    assert verdict({"ci": [-0.05, -0.02]}, -0.01) == "does not hold"
    assert verdict({"ci": [-0.03, 0.01]}, -0.01) == "inconclusive"


def _model_report(correct: list[int], n: int = 4) -> dict:
    """A report at both temperatures with the fields the tables read (pass@k from the counts)."""
    from hdpo_ds.examples.toy.reproduce import pass_at_k

    per_prompt = {f"p{i}": {"correct": c, "n": n} for i, c in enumerate(correct)}
    metrics = {f"pass_at_{k}": float(np.mean([pass_at_k(n, c, k) for c in correct])) for k in range(1, n + 1)}
    metrics |= {"token_entropy": 0.4, "distinct_4": 0.5, "distinct_correct": 1.0}
    return {
        "per_prompt": {t: per_prompt for t in ("0.5", "1")},
        "temperatures": {t: metrics for t in ("0.5", "1")},
    }


def test_the_nll_only_control_is_compared_and_reported():
    """With an NLL term in the setting, the study reports DPO minus the control (the same runs with the
    H-DPO term's weight 0) prompt by prompt; without one there is no control row."""
    from hdpo_ds.examples.toy.reproduce import (
        CONTROL,
        Study,
        render_markdown,
        render_verdict,
        summary_stats,
    )
    from hdpo_ds.examples.toy.stages import Setting

    study = Study(seeds=[0, 1], alphas=[0.9, 1.0], setting=Setting(5e-5, 2, 1.0, 0.05), n=4)
    assert study.names == ["SFT", CONTROL, "alpha=0.9", "alpha=1"]
    assert Study(seeds=[0], alphas=[1.0], setting=Setting(5e-5, 2, 0.0)).names == ["SFT", "alpha=1"]
    pairs = {"sft_correct_rate_t1": 0.1, "counts": {"train_pairs": 10, "eval_pairs": 2}}
    per_seed = {
        # seed 0: DPO - control per prompt (3 - 1, 0 - 2, 1 - 1) / 4 -> mean 0; seed 1: (4 - 0) / 4 -> 1
        0: {
            "SFT": _model_report([0, 0, 0]),
            CONTROL: _model_report([1, 2, 1]),
            "alpha=0.9": _model_report([1, 1, 1]),
            "alpha=1": _model_report([3, 0, 1]),
            "_pairs": pairs,
        },
        1: {
            "SFT": _model_report([0]),
            CONTROL: _model_report([0]),
            "alpha=0.9": _model_report([2]),
            "alpha=1": _model_report([4]),
            "_pairs": pairs,
        },
    }
    stats = summary_stats(study, per_seed)
    d = stats["dpo_vs_control"]["1"]
    assert d["seed_means"] == pytest.approx([0.0, 1.0]) and d["mean"] == pytest.approx(0.5)
    text = render_markdown(study, per_seed, stats, None, ["python x"], {"passk": "p.png"}, 60.0)
    assert f"| {CONTROL} |" in text
    assert f"What the preference term adds: DPO minus {CONTROL}" in text and "**+0.500 [" in text
    assert "per seed +0.000, +1.000" in text
    assert f"without it ({CONTROL}), pass@1 at T = 1, +0.500" in render_verdict(study, stats, None)


def test_the_control_runs_config_is_the_nll_term_alone():
    """The control's overrides after the setting's, as reproduce.run_seed passes them: config.py accepts
    them, and the loss is the sft term at the setting's NLL weight beside H-DPO at weight 0."""
    from hdpo_ds.config import load_config
    from hdpo_ds.examples.toy.reproduce import control_overrides
    from hdpo_ds.examples.toy.stages import Setting

    setting = Setting(5e-5, 2, 1.0, 0.05)
    overrides = [*setting.overrides(100, 8), "loss.alpha=1.0", *control_overrides(setting)]
    loss = load_config(f"{ROOT}/configs/toy/hdpo.yaml", overrides=overrides).loss
    assert (loss.type, loss.weights, loss.nll_weight, loss.beta) == (["hdpo", "sft"], [0.0, 1.0], 0.0, 0.05)
