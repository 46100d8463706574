"""The frozen choice of the toy study's preference-training setting (`make reproduce-search`).

    python -m hdpo_ds.examples.toy.search [--out outputs/toy] [--setting configs/toy/search.json]
        [--results docs/results.md] [--smoke]

A stated grid (GRID), alpha = 1 (DPO), seed 0, judged by pass@1 at T = 1 (n = 8 samples per prompt) on
the task's validation prompts, which share no problem with the evaluation prompts the study reports on.
Stages: seed 0's task, SFT model and pairs (stages.prepare_seed: the same files as the study's seed 0
under the same --out, so `make reproduce` trains no second SFT model), the SFT model's validation
score, then per setting one H-DPO run and its validation score. The best pass@1 wins (a tie goes to the
setting listed first). The grid, every number and the choice go to --setting (committed: the study reads
`chosen` from it and never searches) and to a section of --results between the markers below.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from hdpo_ds.examples.toy.stages import (
    ROOT,
    SETTING_FILE,
    SeedRun,
    Setting,
    Sizes,
    commands_block,
    evaluate,
    prepare_seed,
    shown_commands,
    smoke_sizes,
    train_preference,
    write_section,
)

BEGIN, END = "<!-- toy-search:begin -->", "<!-- toy-search:end -->"
SEARCH_SEED, VAL_SAMPLES = 0, 8
# lr x epochs x NLL weight at beta 0.1, then beta on both sides at one of the middle settings. Pairs: 2 per
# prompt from 8 SFT samples at T = 1 (correct = chosen), fixed for every setting.
GRID = [Setting(lr, epochs, nll) for lr in (2e-5, 5e-5, 1e-4) for epochs in (1, 2) for nll in (0.0, 1.0)] + [
    Setting(5e-5, 2, 1.0, beta) for beta in (0.05, 0.3)
]
SMOKE_GRID = [Setting(1e-4, 1, 0.0), Setting(1e-4, 1, 1.0)]


def val_score(sizes: Sizes, run: SeedRun, model: str, name: str) -> dict:
    report = evaluate(
        sizes,
        run,
        model,
        os.path.join(run.task, "val_prompts.jsonl"),
        os.path.join(run.path("search", name), "val_report.json"),
        temperatures=[1.0],
        ks=[1, VAL_SAMPLES],
        n=VAL_SAMPLES,
        name=f"search-{name}",
        mlflow=False,
    )
    m = report["temperatures"]["1"]
    return {"pass_at_1": m["pass_at_1"], f"pass_at_{VAL_SAMPLES}": m[f"pass_at_{VAL_SAMPLES}"]}


def search(sizes: Sizes, grid: list[Setting], out: str) -> dict:
    run = SeedRun(SEARCH_SEED, os.path.join(out, f"seed{SEARCH_SEED}"), "", [])
    run.tracking_uri = f"sqlite:///{os.path.join(out, 'mlflow.db')}"
    started = time.time()
    prepare_seed(sizes, run)
    counts = run.pair_counts()
    sft = val_score(sizes, run, run.sft_model, "sft")
    rows = []
    for setting in grid:
        train_dir = train_preference(
            sizes, run, setting, 1.0, os.path.join("search", setting.name), eval_every=0
        )
        rows.append(
            {
                "setting": dataclasses.asdict(setting),
                "steps": setting.steps(counts["train_pairs"], sizes.hdpo_batch),
                **val_score(sizes, run, os.path.join(train_dir, "hf"), setting.name),
            }
        )
    best = max(range(len(rows)), key=lambda i: (rows[i]["pass_at_1"], -i))
    return {
        "protocol": {
            "seed": SEARCH_SEED,
            "alpha": 1.0,
            "score": f"pass@1 at T = 1, n = {VAL_SAMPLES}, on val_prompts.jsonl",
            "val_prompts": sizes.val_prompts,
            "pairs": counts,
            "pairs_per_prompt": sizes.pairs_per_prompt,
            "pair_samples": sizes.pair_samples,
            "batch": sizes.hdpo_batch,
        },
        "sft": sft,
        "results": rows,
        "chosen": rows[best]["setting"],
        "elapsed_s": time.time() - started,
        "commands": shown_commands(run.commands, out),
    }


def render_markdown(found: dict) -> str:
    p, sft = found["protocol"], found["sft"]
    k = f"pass_at_{VAL_SAMPLES}"
    lines = [BEGIN, "", "## Toy study, step 1: the frozen setting search (`make reproduce-search`)", ""]
    lines += [
        "Written by `python -m hdpo_ds.examples.toy.search`; do not edit by hand between the markers.",
        "",
        f"DPO (alpha = {p['alpha']:g}) from seed {p['seed']}'s SFT model, one run per setting; score: "
        f"{p['score']} ({p['val_prompts']} prompts that share no problem with the evaluation prompts). "
        f"Pairs: {p['pairs']['train_pairs']} train / {p['pairs']['eval_pairs']} eval, "
        f"{p['pairs_per_prompt']} per prompt from {p['pair_samples']} SFT samples at T = 1 (correct = "
        f"chosen), {p['batch']} pairs per step; cosine schedule, warm-up min(10, steps / 4). "
        f"Wall time {found['elapsed_s'] / 60:.0f} min. The chosen setting is frozen in "
        "`configs/toy/search.json`; `make reproduce` uses it for every alpha and seed.",
        "",
        f"SFT model: pass@1 **{sft['pass_at_1']:.3f}**, pass@{VAL_SAMPLES} {sft[k]:.3f}.",
        "",
        "| lr | epochs | steps | NLL weight | beta | pass@1 | vs SFT | " + f"pass@{VAL_SAMPLES} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in found["results"]:
        s = row["setting"]
        mark = "**" if s == found["chosen"] else ""
        lines.append(
            f"| {s['lr']:g} | {s['epochs']} | {row['steps']} | {s['nll_weight']:g} | {s['beta']:g} | "
            f"{mark}{row['pass_at_1']:.3f}{mark} | {row['pass_at_1'] - sft['pass_at_1']:+.3f} | "
            f"{row[k]:.3f} |"
        )
    c = found["chosen"]
    lines += [
        "",
        f"Chosen (bold): lr {c['lr']:g}, {c['epochs']} epoch(s), NLL weight {c['nll_weight']:g}, "
        f"beta {c['beta']:g}.",
        "",
        *commands_block("Commands:", found["commands"]),
        END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/toy")
    parser.add_argument("--setting", default=SETTING_FILE, help="where the grid, numbers and choice go")
    parser.add_argument("--results", default="docs/results.md")
    parser.add_argument("--smoke", action="store_true", help="two settings on the smoke sizes (tests)")
    args = parser.parse_args(argv)
    sizes, grid = (smoke_sizes(), SMOKE_GRID) if args.smoke else (Sizes(), GRID)
    out = os.path.abspath(args.out)
    found = search(sizes, grid, out)
    from hdpo_ds.common.atomic import write_json

    write_json(args.setting, found)
    write_section(args.results, render_markdown(found), BEGIN, END)
    c = found["chosen"]
    print(
        f"chose {Setting(**c).name} (val pass@1 {max(r['pass_at_1'] for r in found['results']):.3f}, "
        f"SFT {found['sft']['pass_at_1']:.3f}); wrote {args.setting} and {args.results}"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
