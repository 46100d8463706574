"""The adaptive-alpha controller: H-DPO's alpha steered toward a target per-token entropy.

It reads metrics that `dist.reduce_sums` made identical on every rank, so every rank reaches the same
alpha without another collective; the recipe feeds it at each step or each evaluation.

Adaptive alpha (beyond the H-DPO paper, Omura et al. 2024, whose alpha is hand-tuned; what alpha does
is docs/design.md §4: the optimum is proportional to ref^(1/alpha) exp(r / (alpha beta)), so alpha < 1
sharpens and alpha > 1 spreads). `AlphaController` steers log(alpha) from
the smoothed per-token entropy of the chosen responses, H, with a proportional-integral rule:

    e_t     = (EMA(H)_t - H*) / H*                                              relative error
    w_t     = clip(log alpha_init - gain * e_t - integral_gain * sum_{s<=t} e_s, log alpha_min, log alpha_max)
    log a_t = log a_{t-1} + clip(w_t - log a_{t-1}, -max_change, max_change)    rate limit

Entropy above the target lowers alpha (sharper), below raises it. Why proportional by default
(integral_gain 0): training integrates. Alpha sets how fast entropy moves, not where it ends (measured on
the demo: entropy kept falling at a fixed alpha), so the plant already holds an integrator, and an
integral controller around it makes a double integrator that overshoots: our first, integral-only
version drove the demo's entropy 21% below its target before alpha came back (docs/results.md). A
proportional rule brings alpha back toward alpha_init as the error closes, the rate limit bounds each
move (no kick at start), the clip keeps alpha in its bounds, the integral (when used) is frozen while
the wanted alpha sits at a bound (anti-windup), and the EMA removes per-step noise at the cost of lag.
The price of proportional control is a small steady-state error where alpha_init alone still lets
entropy drift; a small integral_gain removes it (docs/monitors.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["AlphaController"]


@dataclass
class AlphaController:
    """H-DPO's alpha steered toward a target per-token entropy of the chosen responses (the module
    docstring has the update rule and why it is stable). Every rank holds one and feeds it the same
    globally reduced entropy, so all ranks keep the same alpha."""

    target: float
    alpha_init: float = 1.0
    alpha_min: float = 0.5
    alpha_max: float = 2.0
    gain: float = 3.0  # proportional: log(alpha) per unit of relative error
    integral_gain: float = 0.0  # integral: log(alpha) per unit of summed relative error
    max_change: float = 0.03  # the most log(alpha) moves in one update
    ema_decay: float = 0.8
    alpha: float = field(default=float("nan"))
    smoothed: float | None = None  # EMA of the entropy
    integral: float = 0.0  # sum of relative errors (frozen while alpha sits at a bound: anti-windup)
    updates: int = 0

    def __post_init__(self) -> None:
        if math.isnan(self.alpha):
            self.alpha = self.alpha_init

    def update(self, entropy: float) -> float:
        """Feed one entropy measurement (nats per token); returns the alpha for what comes next."""
        if not math.isfinite(entropy):
            return self.alpha  # a skipped (non-finite) step says nothing about the entropy
        d = self.ema_decay
        self.smoothed = entropy if self.smoothed is None else d * self.smoothed + (1 - d) * entropy
        error = (self.smoothed - self.target) / self.target
        lo, hi = math.log(self.alpha_min), math.log(self.alpha_max)
        wanted = math.log(self.alpha_init) - self.gain * error - self.integral_gain * (self.integral + error)
        if lo < wanted < hi:
            self.integral += error
        wanted = min(hi, max(lo, wanted))
        current = math.log(self.alpha)
        step = min(self.max_change, max(-self.max_change, wanted - current))
        self.alpha = math.exp(min(hi, max(lo, current + step)))
        self.updates += 1
        return self.alpha

    def state_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "smoothed": self.smoothed,
            "integral": self.integral,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.smoothed = float(state["alpha"]), state["smoothed"]
        self.integral, self.updates = float(state["integral"]), int(state["updates"])
