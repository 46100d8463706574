"""Over-optimisation detectors on evaluation metrics (the adaptive-alpha controller: alpha.py).

They read metrics that `dist.reduce_sums` made identical on every rank, so every rank reaches the same
decision (stop, next alpha) without another collective (docs/design.md §5); only rank 0 reports.

Detectors (Shi et al. 2024, "Understanding likelihood over-optimisation in direct alignment
algorithms": top-k entropy and top-k mass of the policy's next-token distribution as early signs),
each on a smoothed series of evaluation points (EMA or a trailing window, `monitors.smoothing`):

  topk_entropy_turn       (a) top-k entropy rose, then fell more than `turn_drop` bits below its peak
  logps_falling           (b) per-token log-probs of chosen AND rejected fell at each of the last
                              `falling_evals` evaluations
  topk_mass_collapse      (c) top-k mass under `topk_mass_floor`, or falling faster than
                              `topk_mass_max_drop_per_step` per training step
  accuracy_saturated      (d) reward accuracy >= `accuracy_saturation` at each of the last
                              `saturated_evals` + 1 evaluations while the margin grew at each of them

Each detector fires once per run (the first evaluation where its condition holds). The detectors are
pure functions of the evaluation history, so a resumed run that reloads the history decides as an
uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "DETECTORS",
    "PLOT_KEYS",
    "Alert",
    "MonitorSuite",
    "accuracy_saturated",
    "logps_falling",
    "smooth",
    "topk_entropy_turn",
    "topk_mass_collapse",
]

DETECTORS = ("topk_entropy_turn", "logps_falling", "topk_mass_collapse", "accuracy_saturated")
# The training series the end-of-run plots draw (hdpo_ds/tracking/report.py); evaluations keep every metric.
PLOT_KEYS = (
    "loss",
    "entropy/chosen",
    "entropy/rejected",
    "topk_mass/chosen",
    "topk_mass/rejected",
    "topk_entropy/chosen",
    "topk_entropy/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen_mean",
    "logps/rejected_mean",
    "alpha",
)


def smooth(values: list[float], *, kind: str, ema_decay: float = 0.5, window: int = 3) -> list[float]:
    """The smoothed series, same length as `values`.

    ema:    s_0 = v_0, s_t = decay * s_{t-1} + (1 - decay) * v_t (no warm-up bias: it starts at v_0)
    window: s_t = mean(v_{max(0, t-window+1)} .. v_t)
    none:   s_t = v_t
    """
    if kind == "none":
        return list(values)
    if kind == "window":
        return [
            sum(values[max(0, t - window + 1) : t + 1]) / (t + 1 - max(0, t - window + 1))
            for t in range(len(values))
        ]
    if kind != "ema":
        raise ValueError(f"smoothing kind must be ema, window or none, got {kind!r}")
    out: list[float] = []
    for v in values:
        out.append(v if not out else ema_decay * out[-1] + (1 - ema_decay) * v)
    return out


def topk_entropy_turn(values: list[float], *, min_drop: float, min_rise: float = 0.0) -> bool:
    """(a) The series rose above its first value by more than `min_rise` to a peak, and its last
    value lies more than `min_drop` below that peak. values: smoothed top-k entropy (bits)."""
    if len(values) < 3:
        return False
    peak_index = max(range(len(values) - 1), key=lambda i: values[i])
    rose = peak_index > 0 and values[peak_index] - values[0] > min_rise
    return rose and values[peak_index] - values[-1] > min_drop


def logps_falling(chosen: list[float], rejected: list[float], *, evals: int) -> bool:
    """(b) Both series fell at each of the last `evals` points (strictly). values: smoothed per-token
    mean log-probs of chosen and of rejected responses."""
    if len(chosen) < evals + 1:
        return False
    return all(
        chosen[t] < chosen[t - 1] and rejected[t] < rejected[t - 1]
        for t in range(len(chosen) - evals, len(chosen))
    )


def topk_mass_collapse(
    values: list[float], steps: list[int], *, floor: float, max_drop_per_step: float
) -> bool:
    """(c) The last value is under `floor`, or the last interval's fall per training step exceeds
    `max_drop_per_step` (0 disables either test). values: smoothed top-k mass in [0, 1]."""
    if not values:
        return False
    if floor > 0 and values[-1] < floor:
        return True
    if max_drop_per_step > 0 and len(values) >= 2 and steps[-1] > steps[-2]:
        return (values[-2] - values[-1]) / (steps[-1] - steps[-2]) > max_drop_per_step
    return False


def accuracy_saturated(
    accuracies: list[float], margins: list[float], *, saturation: float, evals: int
) -> bool:
    """(d) Reward accuracy >= `saturation` at each of the last `evals` + 1 points while the reward
    margin grew (strictly) at each of the last `evals`: the pairs are learnt; the margin keeps growing."""
    if len(accuracies) < evals + 1:
        return False
    recent = range(len(accuracies) - evals, len(accuracies))
    return all(a >= saturation for a in accuracies[-(evals + 1) :]) and all(
        margins[t] > margins[t - 1] for t in recent
    )


@dataclass(frozen=True)
class Alert:
    detector: str
    step: int
    message: str
    values: dict[str, float]

    def to_json(self) -> dict:
        return {"detector": self.detector, "step": self.step, "message": self.message, "values": self.values}


# The evaluation metrics the detectors read (a `side` of chosen or rejected picks the first two).
def _keys(side: str) -> dict[str, str]:
    return {
        "topk_entropy": f"eval/topk_entropy/{side}",
        "topk_mass": f"eval/topk_mass/{side}",
        "logps_chosen": "eval/logps/chosen_mean",
        "logps_rejected": "eval/logps/rejected_mean",
        "accuracy": "eval/rewards/accuracies",
        "margin": "eval/rewards/margins",
    }


@dataclass
class MonitorSuite:
    """The detectors over one run's evaluation history, the best evaluation, and the series the end-of-run
    plots draw (kept here, and in checkpoints, so plots need no tracking server and survive resumes).

    `observe(step, eval_metrics)` appends an evaluation and returns the alerts that fire there;
    `record_train(step, metrics)` keeps the training series of PLOT_KEYS. `cfg` is the `monitors` section
    of the run config (hdpo_ds.config.MonitorsConfig).
    """

    cfg: object
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, eval/ metrics)
    train_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    fired: dict[str, int] = field(default_factory=dict)  # detector -> the step it fired at
    alerts: list[Alert] = field(default_factory=list)

    def record_train(self, step: int, metrics: dict[str, float]) -> None:
        self.train_history.append((step, {k: float(metrics[k]) for k in PLOT_KEYS if k in metrics}))

    def observe(self, step: int, metrics: dict[str, float]) -> list[Alert]:
        keys = _keys(self.cfg.side)
        self.history = [(s, m) for s, m in self.history if s < step]  # an evaluation redone after a resume
        self.history.append((step, {k: float(v) for k, v in metrics.items()}))
        if not self.cfg.enabled:
            return []
        steps = [s for s, _ in self.history]
        series = {
            k: smooth(
                [m[key] for _, m in self.history],
                kind=self.cfg.smoothing,
                ema_decay=self.cfg.ema_decay,
                window=self.cfg.window,
            )
            for k, key in keys.items()
        }
        c = self.cfg
        checks = {
            "topk_entropy_turn": lambda: topk_entropy_turn(series["topk_entropy"], min_drop=c.turn_drop),
            "logps_falling": lambda: logps_falling(
                series["logps_chosen"], series["logps_rejected"], evals=c.falling_evals
            ),
            "topk_mass_collapse": lambda: topk_mass_collapse(
                series["topk_mass"],
                steps,
                floor=c.topk_mass_floor,
                max_drop_per_step=c.topk_mass_max_drop_per_step,
            ),
            "accuracy_saturated": lambda: accuracy_saturated(
                series["accuracy"],
                series["margin"],
                saturation=c.accuracy_saturation,
                evals=c.saturated_evals,
            ),
        }
        alerts = []
        for name, check in checks.items():
            if name in self.fired or name not in c.detectors or not check():
                continue
            self.fired[name] = step
            values = {k: round(v[-1], 6) for k, v in series.items()}
            values["peak_topk_entropy"] = round(max(series["topk_entropy"]), 6)
            values["topk_entropy_drop"] = round(values["peak_topk_entropy"] - values["topk_entropy"], 6)
            alerts.append(Alert(name, step, _MESSAGES[name].format(**values, c=c), values))
        self.alerts.extend(alerts)
        return alerts

    def best(self, metric: str, mode: str, candidates: set[int] | None = None) -> tuple[int, float] | None:
        """The (step, value) of the best raw evaluation of `metric` ("eval/loss" ...), among
        `candidates` steps when given."""
        values = [
            (s, m[metric]) for s, m in self.history if metric in m and (candidates is None or s in candidates)
        ]
        values = [(s, v) for s, v in values if math.isfinite(v)]
        if not values:
            return None
        return (min if mode == "min" else max)(values, key=lambda sv: sv[1])  # ties: the earliest

    def state_dict(self) -> dict:
        return {
            "history": [[s, m] for s, m in self.history],
            "fired": dict(self.fired),
            "train_history": [[s, m] for s, m in self.train_history],
            "alerts": [a.to_json() for a in self.alerts],
        }

    def load_state_dict(self, state: dict, resume_step: int) -> None:
        """What was observed up to the checkpoint at `resume_step`: training steps before it, and
        evaluations up to it (the evaluation at resume_step ran before the checkpoint was written)."""
        self.history = [(int(s), dict(m)) for s, m in state["history"] if int(s) <= resume_step]
        self.train_history = [(int(s), dict(m)) for s, m in state["train_history"] if int(s) < resume_step]
        self.fired = {k: int(v) for k, v in state["fired"].items() if int(v) <= resume_step}
        self.alerts = [Alert(**a) for a in state["alerts"] if int(a["step"]) <= resume_step]


_MESSAGES = {
    "topk_entropy_turn": "top-k entropy passed a turning point: {topk_entropy:.4f} bits, "
    "{topk_entropy_drop:.4f} (> {c.turn_drop}) below its peak {peak_topk_entropy:.4f}",
    "logps_falling": "log-probs of chosen ({logps_chosen:.4f}) and rejected ({logps_rejected:.4f}) per token "
    "fell at each of the last {c.falling_evals} evaluations",
    "topk_mass_collapse": "top-k mass {topk_mass:.4f} is under the floor {c.topk_mass_floor} or fell faster "
    "than {c.topk_mass_max_drop_per_step} per step",
    "accuracy_saturated": "reward accuracy {accuracy:.4f} >= {c.accuracy_saturation} while the margin "
    "({margin:.4f}) grew at each of the last {c.saturated_evals} evaluations",
}
