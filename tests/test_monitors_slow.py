"""Demo-scale checks of the monitors (`make test-slow`; numbers recorded in docs/results.md).

- An over-optimising demo run (64 pairs, lr 5e-3, 120 steps, evaluation every 4 steps): every alert comes
  where its documented condition first holds; the first, (a) or (b), after the first evaluation and no
  later than the held-out loss's minimum, with that loss already within 5% of it.
- Adaptive alpha on the demo task (all 2000 pairs, the demo's cosine schedule, 80 steps of 32 pairs,
  the controller's defaults): with a target of 4.8 nats the smoothed chosen-token entropy reaches the
  +-10% band and alpha stays in its bounds, where a fixed alpha of 1 never reaches the band.
"""

from __future__ import annotations

import pytest

from tests.test_monitors_runs import documented_alerts, run_demo

pytestmark = pytest.mark.slow

COMMON = ["train.export_hf=false", "logging.progress_bar=false"]
OVEROPT_LONG = [
    "data.rows=0:64",
    "train.pairs_per_step=16",
    "optim.lr=5e-3",
    "optim.schedule=constant",
    "optim.warmup_steps=0",
    "train.max_steps=120",
    "train.eval_every=4",
    "train.save_every=8",
    *COMMON,
]
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
    assert {a["detector"]: a["step"] for a in alerts} == documented_alerts(run["metrics"])
    first = alerts[0]
    assert first["detector"] in ("topk_entropy_turn", "logps_falling")
    assert sorted(loss)[0] < first["step"] <= best_loss_step
    assert loss[first["step"]] <= 1.05 * loss[best_loss_step]


def _smoothed(series: dict[int, float], decay: float = 0.8) -> dict[int, float]:
    """The controller's EMA (loss.alpha_ema default) of a per-step series."""
    out, value = {}, None
    for step in sorted(series):
        value = series[step] if value is None else decay * value + (1 - decay) * series[step]
        out[step] = value
    return out


def test_adaptive_alpha_reaches_the_target_band_where_fixed_alpha_does_not(tmp_path):
    auto = run_demo(tmp_path, "auto", [*DEMO_80, *AUTO])
    fixed = run_demo(tmp_path, "fixed1", [*DEMO_80, "loss.alpha=1.0"])

    alphas = auto["metrics"]["alpha"]
    h_auto = auto["metrics"]["alpha/entropy_smoothed"]
    h_fixed = _smoothed(fixed["metrics"]["entropy/chosen"])
    assert h_auto == pytest.approx(_smoothed(auto["metrics"]["entropy/chosen"]), rel=1e-9)

    def in_band(series):
        return [s for s in sorted(series) if abs(series[s] - TARGET) / TARGET < 0.10]

    def report(name, series):
        closest = min(series, key=lambda s: abs(series[s] - TARGET))
        return (
            f"{name}: closest {series[closest]:.3f} at step {closest}, final {series[79]:.3f} "
            f"({(series[79] - TARGET) / TARGET:+.1%}), {len(in_band(series))} steps in the band"
        )

    print(f"\ntarget {TARGET} nats, band +-10%")
    print(
        report("adaptive", h_auto) + f"; alpha {min(alphas.values()):.3f}..{max(alphas.values()):.3f}, "
        f"final {alphas[79]:.3f}"
    )
    print(report("fixed alpha 1", h_fixed))
    assert in_band(h_auto), "the adaptive run never reached the target band"
    assert not in_band(h_fixed), "fixed alpha 1 reached the band too: no contrast"
    assert all(0.5 - 1e-9 <= a <= 2.0 + 1e-9 for a in alphas.values())
