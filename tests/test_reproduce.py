"""The toy reproduction pipeline end to end, small (hdpo_ds/examples/toy/reproduce.py --smoke): task -> SFT ->
sampled pairs -> H-DPO for two alphas -> pass@k report, markdown and plot; a second run redoes nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from tests.run_helpers import ROOT


def test_smoke_reproduction(tmp_path):
    out, results, plot = tmp_path / "toy", tmp_path / "results.md", tmp_path / "img" / "passk.png"
    results.write_text("# Results\n\nhand-written text that must survive\n")
    cmd = [
        sys.executable,
        "-m",
        "hdpo_ds.examples.toy.reproduce",
        "--smoke",
        "--out",
        str(out),
        "--results",
        str(results),
        "--plot",
        str(plot),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "results.json").read_text())
    reports = data["results"]["0"]
    assert set(reports) == {"SFT", "alpha=0.8", "alpha=1", "_pairs"}
    assert reports["_pairs"]["counts"]["train_pairs"] > 0
    runs = {"SFT": "sft", "alpha=0.8": "hdpo_alpha0.8", "alpha=1": "hdpo_alpha1"}
    for name in ("SFT", "alpha=0.8", "alpha=1"):
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
    assert reports["alpha=0.8"]["per_prompt"] != reports["alpha=1"]["per_prompt"] or (
        reports["alpha=0.8"]["temperatures"]["1"]["token_entropy"]
        != reports["alpha=1"]["temperatures"]["1"]["token_entropy"]
    )
    text = results.read_text()
    assert "hand-written text that must survive" in text
    assert text.count("<!-- toy-reproduce:begin -->") == 1 and "| 0 | alpha=0.8 |" in text
    assert (
        "launch/sft.py" in text
        and "launch/train.py" in text
        and "Does the entropy fall as alpha falls?" in text
    )
    assert plot.stat().st_size > 10_000

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ python" not in again.stdout  # every stage's output exists: nothing is run again
    assert results.read_text().count("<!-- toy-reproduce:begin -->") == 1
