"""Sample n completions per prompt and report pass@k, token entropy and diversity
(hdpo_ds/recipes/evaluate.py).

python launch/evaluate.py --model outputs/run/hf --prompts eval.jsonl --checker arith \
    --temperatures 0.5 1.0 --k 1 4 16 -n 32 --out outputs/run/eval/report.json
deepspeed --num_accelerators 2 launch/evaluate.py ...   # data-parallel: prompts split over the ranks
torchrun --nproc-per-node 8 launch/evaluate.py ...

--model: a Hugging Face model directory (a run's hf/), a checkpoint folder, a checkpoints root or a
run's output_dir (the newest complete checkpoint is exported next to --out first). --prompts: JSONL /
JSON / Parquet rows with `prompt` (text or role/content messages), an optional `id`, and what the checker
reads (`answer` for the built-in ones). --checker: arith | exact | contains | package.module:function.
Results: --out (JSON) and one MLflow run (logging.tracking_uri rules: --tracking-uri, else
MLFLOW_TRACKING_URI, else sqlite:///mlflow.db). Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hdpo_ds.runtime import stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--base",
        default="",
        help="with a LoRA adapter directory as --model: its base model (default: the adapter's)",
    )
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--checker", default="exact")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16], help="pass@k for these k (each <= n)")
    # not "--n": the deepspeed launcher would take it as an abbreviation of its own options
    parser.add_argument(
        "-n", "--num-samples", type=int, default=32, dest="n", help="samples per prompt and temperature"
    )
    parser.add_argument("--n", type=int, dest="n", help=argparse.SUPPRESS)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts-per-batch", type=int, default=8, help="prompts per batch (x n rows)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N prompts (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--chat-template", default="", help="a Jinja file or text for tokenizers without one")
    parser.add_argument("--out", required=True, help="the JSON report")
    parser.add_argument("--samples", default="", help="also write every completion here (JSONL)")
    parser.add_argument("--tracking-uri", default="")
    parser.add_argument("--experiment", default="hdpo_ds-eval")
    parser.add_argument("--run-name", default="")
    parser.add_argument("--no-mlflow", action="store_true", help="write the JSON report only")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from hdpo_ds.runtime import dist

    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
    )
    from hdpo_ds.data import DataError
    from hdpo_ds.recipes.evaluate import EvalSettings, run_evaluation

    settings = EvalSettings(
        temperatures=args.temperatures,
        ks=args.k,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        prompts_per_batch=args.prompts_per_batch,
        checker=args.checker,
        chat_template=args.chat_template,
    )
    try:
        result = run_evaluation(
            args.model,
            args.prompts,
            settings,
            out_path=args.out,
            samples_path=args.samples or None,
            limit=args.limit,
            dtype=args.dtype,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            run_name=args.run_name,
            log_mlflow=not args.no_mlflow,
            show_progress=not args.no_progress,
            base=args.base,
        )
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error (rank {rank}): {err}", file=sys.stderr)
        return 2
    if rank == 0:
        ks = [f"pass@{k}" for k in args.k]
        print(f"\n{result['num_prompts']} prompts x {args.n} samples, {result['world_size']} rank(s):")
        for t, m in result["temperatures"].items():
            passes = "  ".join(f"{name} {m[f'pass_at_{k}']:.3f}" for name, k in zip(ks, args.k, strict=True))
            print(
                f"  T={t}: {passes}  entropy {m['token_entropy']:.3f}  distinct-4 {m['distinct_4']:.3f}  "
                f"distinct correct {m['distinct_correct']:.2f}"
            )
        print(f"report: {os.path.abspath(args.out)}")
        if result.get("mlflow_run_id"):
            print(f"MLflow run: {result['mlflow_run_id']} in {result['tracking_uri']}")
    dist.shutdown()
    return 0


if __name__ == "__main__":
    stop.exit_process(main())
