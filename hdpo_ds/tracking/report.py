"""PNG plots of a run's over-optimisation monitors, with the detectors' alerts marked.

    python -m hdpo_ds.tracking.report RUN_ID [--tracking-uri URI] [--out DIR] [--no-log]

reads the run's metric histories and its alerts from MLflow, writes one PNG per panel plus an overview
(`monitors.png`) to DIR (default: ./report-<run id>), and logs them to the run under `plots/`. The
trainer renders the same plots at the end of a run from the series it kept itself (so no tracking
server is needed then).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["PANELS", "history_from_mlflow", "main", "render"]

# panel name -> (title, y label, metric keys drawn; each is drawn for training and, as eval/<key>, evaluation)
PANELS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "entropy": ("Token entropy", "nats", ("entropy/chosen", "entropy/rejected")),
    "topk_mass": ("Top-k probability mass", "mass", ("topk_mass/chosen", "topk_mass/rejected")),
    "topk_entropy": ("Top-k entropy", "bits", ("topk_entropy/chosen", "topk_entropy/rejected")),
    "margins": ("Reward margin", "reward", ("rewards/margins",)),
    "accuracies": ("Reward accuracy", "fraction", ("rewards/accuracies",)),
    "logps": ("Log-prob per token", "nats", ("logps/chosen_mean", "logps/rejected_mean")),
    "alpha": ("H-DPO alpha", "alpha", ("alpha",)),
    "loss": ("Loss", "loss", ("loss",)),
}


def _series(history: list[tuple[int, dict[str, float]]], key: str) -> tuple[list[int], list[float]]:
    points = [(s, m[key]) for s, m in history if key in m]
    return [s for s, _ in points], [v for _, v in points]


def render(
    train_history: list[tuple[int, dict[str, float]]],
    eval_history: list[tuple[int, dict[str, float]]],
    alerts: list[dict],
    out_dir: str,
    *,
    title: str = "",
) -> list[str]:
    """Draw each panel that has data, and an overview of all of them; returns the PNG paths.

    train_history: (step, {key: value}) per training step; eval_history: (step, {"eval/key": value})
    per evaluation; alerts: {"detector", "step", ...} dicts, drawn as vertical lines on every panel.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    drawn = {
        name: spec
        for name, spec in PANELS.items()
        if any(_series(train_history, k)[0] or _series(eval_history, f"eval/{k}")[0] for k in spec[2])
    }
    paths = []

    def draw(ax, name: str) -> None:
        label, ylabel, keys = drawn[name]
        for i, key in enumerate(keys):
            color = f"C{i}"
            steps, values = _series(train_history, key)
            if steps:
                ax.plot(steps, values, color=color, alpha=0.45, linewidth=1, label=f"train {key}")
            steps, values = _series(eval_history, f"eval/{key}")
            if steps:
                ax.plot(
                    steps, values, color=color, marker="o", markersize=3, linewidth=1.8, label=f"eval {key}"
                )
        for j, alert in enumerate(alerts):
            ax.axvline(
                alert["step"],
                color="red",
                linestyle="--",
                linewidth=1,
                label=f"alert: {alert['detector']} (step {alert['step']})" if j < 4 else None,
            )
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")

    for name in drawn:
        fig, ax = plt.subplots(figsize=(7, 4))
        draw(ax, name)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if drawn:
        cols = 2
        rows = (len(drawn) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(13, 3.6 * rows), squeeze=False)
        for ax, name in zip(axes.flat, drawn, strict=False):
            draw(ax, name)
        for ax in list(axes.flat)[len(drawn) :]:
            ax.axis("off")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(out_dir, "monitors.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def history_from_mlflow(client, run_id: str) -> tuple[list, list, list[dict]]:
    """(train_history, eval_history, alerts) of a logged run; alerts from its alerts.jsonl artifact."""
    run = client.get_run(run_id)
    keys = {k for _, _, ks in PANELS.values() for k in ks}
    train: dict[int, dict[str, float]] = {}
    evals: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        target = evals if key.startswith("eval/") else train
        if key.removeprefix("eval/") not in keys:
            continue
        for point in client.get_metric_history(run_id, key):
            target.setdefault(point.step, {})[key] = point.value
    alerts: list[dict] = []
    if any(a.path == "alerts.jsonl" for a in client.list_artifacts(run_id)):
        path = client.download_artifacts(run_id, "alerts.jsonl")
        with open(path) as f:
            alerts = [json.loads(line) for line in f if line.strip()]
    return sorted(train.items()), sorted(evals.items()), alerts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_id")
    parser.add_argument(
        "--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    parser.add_argument("--out", default="", help="folder for the PNGs (default ./report-<run id>)")
    parser.add_argument("--no-log", action="store_true", help="do not log the PNGs to the run")
    args = parser.parse_args(argv)

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from hdpo_ds.tracking.mlflow_logger import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    client = MlflowClient(uri)
    try:
        train, evals, alerts = history_from_mlflow(client, args.run_id)
    except MlflowException as e:
        print(f"error: run {args.run_id} at {uri}: {e.message}", file=sys.stderr)
        return 2
    if not train and not evals:
        print(f"error: run {args.run_id} at {uri} has no monitor metrics to plot", file=sys.stderr)
        return 2
    out = args.out or f"report-{args.run_id}"
    paths = render(train, evals, alerts, out, title=client.get_run(args.run_id).info.run_name or args.run_id)
    if not args.no_log:
        for path in paths:
            client.log_artifact(args.run_id, path, "plots")
    print(
        f"{len(paths)} plots in {os.path.abspath(out)}"
        + ("" if args.no_log else f"; logged to run {args.run_id}")
    )
    print(f"alerts: {len(alerts)}" + "".join(f"\n  step {a['step']}: {a['detector']}" for a in alerts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
