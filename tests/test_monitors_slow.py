"""Demo-scale checks of the monitors (`make test-slow`; numbers recorded in docs/results.md).

- An over-optimising demo run (64 pairs, lr 5e-3, 120 steps, evaluation every 4 steps): detector (a) or
  (b) fires no later than the held-out loss's minimum, or before eval reward accuracy peaks.
- Adaptive alpha on the demo task (all 2000 pairs, the demo's cosine schedule, 80 steps of 32 pairs):
  with a target of 4.8 nats the controller ends within 10% of the target and stays in its bounds, where
  a fixed alpha of 1 ends outside the band.
"""

from __future__ import annotations

import pytest

from tests.test_monitors_runs import run_demo

pytestmark = pytest.mark.slow

COMMON = ["train.export_hf=false", "logging.progress_bar=false"]
OVEROPT_LONG = [
    "data.rows=0:64", "train.pairs_per_step=16", "optim.lr=5e-3", "optim.schedule=constant",
    "optim.warmup_steps=0", "train.max_steps=120", "train.eval_every=4", "train.save_every=8", *COMMON,
]  # fmt: skip
TARGET = 4.8
DEMO_80 = ["train.pairs_per_step=32", "train.max_steps=80", "train.eval_every=10", *COMMON]
AUTO = ["loss.alpha=auto", f"loss.target_entropy={TARGET}"]  # the controller's defaults


def test_overoptimising_demo_run_alerts_early(tmp_path):
    run = run_demo(tmp_path, "overopt_long", OVEROPT_LONG)
    alerts = run["info"]["alerts"]
    loss = run["metrics"]["eval/loss"]
    accuracy = run["metrics"]["eval/rewards/accuracies"]
    best_loss_step = min(loss, key=lambda s: (loss[s], s))
    peak_accuracy_step = max(accuracy, key=lambda s: (accuracy[s], -s))
    print("\nalerts:", [(a["detector"], a["step"]) for a in alerts])
    print(
        f"eval loss lowest at step {best_loss_step} ({loss[best_loss_step]:.4f}); at the end {loss[120]:.4f}"
    )
    print(f"eval reward accuracy peaks at step {peak_accuracy_step} ({accuracy[peak_accuracy_step]:.4f})")
    early = [a for a in alerts if a["detector"] in ("topk_entropy_turn", "logps_falling")]
    assert early, "neither (a) nor (b) fired"
    assert early[0]["step"] <= best_loss_step or early[0]["step"] < peak_accuracy_step


def test_adaptive_alpha_reaches_the_target_band_where_fixed_alpha_does_not(tmp_path):
    auto = run_demo(tmp_path, "auto", [*DEMO_80, *AUTO])
    fixed = run_demo(tmp_path, "fixed1", [*DEMO_80, "loss.alpha=1.0"])

    def tail_entropy(run):  # the smoothed chosen-token entropy over the last 10 steps
        series = run["metrics"]["entropy/chosen"]
        return sum(series[s] for s in range(70, 80)) / 10

    alphas = auto["metrics"]["alpha"]
    h_auto, h_fixed = tail_entropy(auto), tail_entropy(fixed)
    print(f"\ntarget {TARGET}: adaptive {h_auto:.3f} ({(h_auto - TARGET) / TARGET:+.1%}), final alpha "
          f"{alphas[79]:.3f}, min {min(alphas.values()):.3f}; fixed alpha 1: {h_fixed:.3f} "
          f"({(h_fixed - TARGET) / TARGET:+.1%})")  # fmt: skip
    assert abs(h_auto - TARGET) / TARGET < 0.10
    assert abs(h_fixed - TARGET) / TARGET > 0.10
    assert all(0.5 - 1e-9 <= a <= 2.0 + 1e-9 for a in alphas.values())
