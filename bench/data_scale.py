"""The data stage at production size: start-up time and memory per rank against the number of pairs.

For each size (default 10k, 100k, 1M pairs of about 1.5 KB: text pairs, every tenth a conversation, with
explicit ids and a few planted bad records), two starts of 2 ranks (`deepspeed --num_accelerators 2`, the
demo config and tokenizer, `data.on_bad_record=skip`): the first with an empty cache (rank 0 reads,
validates and tokenizes through data/prepare.py), then a cached one. Each rank runs exactly the
trainer's data stage (`recipes/splits.prepare_split`, then the `PairSampler` over the length columns) and
reports its time and, sampled every 20 ms, its peak RSS and peak anonymous memory (`RssAnon`: Arrow pages
mapped from the cache count in RSS but not here). The planted bad records are checked against the skip
counts. `--train-steps K` then trains K steps of the real trainer on the largest set, on the cache.

    .venv/bin/python bench/data_scale.py [--pairs 10000 100000 1000000] [--train-steps 2]
        [--workdir /tmp/hdpo_ds_data_scale] [--num-proc 0] [--json OUT]

The workdir keeps the generated files (1.5 GB for 1M pairs) and the caches between invocations.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.plan_rss import _free_port, _status  # noqa: E402  (the same /proc and port helpers)

WORDS = (
    "the a model answer question because water light river number seven quickly carefully explain "
    "reason first second then finally however small large city history music science garden window "
    "travel morning evening simple detail example result method paper figure table value change"
).split()
BAD_EVERY = 100_000  # one record without "chosen" per this many rows, and the last row: all must be skipped


def generate(path: str, pairs: int, seed: int = 0) -> int:
    """Write ``pairs`` rows of JSON Lines (about 1.5 KB each); the number of planted bad rows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    bad = 0
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for start in range(0, pairs, 10_000):
            n = min(10_000, pairs - start)
            picks = words[rng.integers(0, len(words), size=(n, 3, 70))]
            for j in range(n):
                i = start + j
                prompt, chosen, rejected = (" ".join(part) for part in picks[j])
                if i % 10 == 9:
                    row = {
                        "id": f"p{i}",
                        "prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}],
                    }
                else:
                    row = {
                        "id": f"p{i}",
                        "prompt": prompt,
                        "chosen": " " + chosen,
                        "rejected": " " + rejected,
                    }
                if (i % BAD_EVERY == BAD_EVERY - 1) or i == pairs - 1:
                    del row["chosen"]
                    bad += 1
                f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return bad


def overrides(data: str, cache: str, out: str, num_proc: int) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.train_files=[{data}]",
        "data.eval_files=[]",
        f"data.cache_dir={cache}",
        "data.on_bad_record=skip",
        f"data.num_proc={num_proc}",
        f"logging.tracking_uri=sqlite:///{os.path.join(out, 'mlflow.db')}",
        "logging.progress_bar=false",
    ]


class PeakSampler:
    """The largest RssAnon and VmRSS of this process, sampled every 20 ms on a thread."""

    def __init__(self) -> None:
        self.anon = self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.anon = max(self.anon, _status("RssAnon"))
            self.rss = max(self.rss, _status("VmRSS"))
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.anon = max(self.anon, _status("RssAnon"))
        self.rss = max(self.rss, _status("VmRSS"))


def worker(argv: list[str]) -> None:
    """One rank: the trainer's data stage (prepare_split, then the sampler), timed and sampled."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args(argv)

    from hdpo_ds.config import load_config
    from hdpo_ds.data.sampler import PairSampler
    from hdpo_ds.recipes.splits import check_data_options, prepare_split
    from hdpo_ds.runtime import dist, engine
    from hdpo_ds.runtime.models import load_tokenizer

    cfg = load_config(os.path.join(ROOT, "configs/demo.yaml"), args.rest)
    tokenizer = load_tokenizer(cfg.model)
    check_data_options(cfg)
    engine.init_distributed(cfg.train.dist_timeout_minutes)
    dist.barrier()
    baseline = {"anon": _status("RssAnon"), "rss": _status("VmRSS")}
    start = time.perf_counter()
    with PeakSampler() as peak:
        split = prepare_split(cfg, "train", tokenizer)
        sampler = PairSampler(
            split.data.pairs.lengths,
            pairs_per_step=cfg.train.pairs_per_step,
            world_size=dist.world_size(),
            rank=dist.rank(),
            seed=cfg.train.seed,
            max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch,
            max_length=cfg.data.max_length,
            packing=cfg.data.packing,
        )
        first_step = sampler.assignment(0, 0)  # what the first training step reads
    seconds = time.perf_counter() - start
    report = {
        "rank": dist.rank(),
        "seconds": seconds,
        "baseline_anon": baseline["anon"],
        "peak_anon": peak.anon,
        "baseline_rss": baseline["rss"],
        "peak_rss": peak.rss,
        "pairs": len(split.data.pairs),
        "rows": split.records.num_rows,
        "skipped": dict(split.records.skipped),
        "stats": {k: v for k, v in split.data.stats.items() if v},
        "built": not split.data.from_cache,
        "first_step_micro_batches": len(first_step.micro_batches),
    }
    dist.barrier()
    dist.shutdown()
    with open(os.path.join(args.out, f"rank{report['rank']}.json"), "w") as f:
        json.dump(report, f)


def _env() -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(PYTHONPATH=ROOT, MALLOC_MMAP_THRESHOLD_="65536")  # freed blocks go back: RSS follows live data
    return env


def deepspeed_cmd(*args: str) -> list[str]:
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [launcher, "--num_accelerators", "2", "--master_port", str(_free_port()), *args]


def start(name: str, extra: list[str], workdir: str) -> list[dict]:
    out = os.path.join(workdir, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cmd = deepspeed_cmd(os.path.abspath(__file__), "--worker", "--out", out, *extra)
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    ranks = []
    for rank in range(2):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    ranks[0]["wall"] = time.perf_counter() - began
    return ranks


def train(data: str, cache: str, workdir: str, steps: int, num_proc: int) -> dict:
    """The real trainer for ``steps`` steps on the prepared (cached) set."""
    out = os.path.join(workdir, "train")
    shutil.rmtree(out, ignore_errors=True)
    cmd = deepspeed_cmd(
        "launch/train.py",
        "--ds",
        "ds_configs/zero3.json",
        "--config",
        "configs/demo.yaml",
        *overrides(data, cache, out, num_proc),
        f"train.max_steps={steps}",
        "train.eval_every=0",
        "train.export_hf=false",
        "optim.warmup_steps=0",
    )
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return {"steps": steps, "wall": time.perf_counter() - began}


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workdir", default="/tmp/hdpo_ds_data_scale")
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--num-proc", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    results = []
    for pairs in args.pairs:
        data = os.path.join(args.workdir, f"pairs-{pairs}.jsonl")
        began = time.perf_counter()
        bad = generate(data, pairs)
        generated = time.perf_counter() - began
        cache = os.path.join(args.workdir, f"cache-{pairs}")
        shutil.rmtree(cache, ignore_errors=True)
        extra = overrides(data, cache, os.path.join(args.workdir, f"out-{pairs}"), args.num_proc)
        first = start(f"first-{pairs}", extra, args.workdir)
        cached = start(f"cached-{pairs}", extra, args.workdir)
        for ranks in (first, cached):
            assert ranks[0]["skipped"] == {"missing_field": bad}, (ranks[0]["skipped"], bad)
            assert ranks[0]["pairs"] == ranks[1]["pairs"] == pairs - bad
        assert first[0]["built"] and not cached[0]["built"]
        row = {
            "pairs": pairs,
            "file_bytes": os.path.getsize(data),
            "generate_s": generated,
            "bad_rows": bad,
            "first": first,
            "cached": cached,
        }
        results.append(row)
        print(
            f"{pairs:,} pairs ({os.path.getsize(data) / pairs:,.0f} B/pair, {bad} bad rows, all skipped); "
            f"generated in {generated:.0f} s",
            flush=True,
        )
        for label, ranks in (("first", first), ("cached", cached)):
            for r in ranks:
                print(
                    f"  {label:>6} start, rank {r['rank']}: data stage {r['seconds']:7.1f} s, "
                    f"peak RSS {mb(r['peak_rss']):>6} MB, RssAnon {mb(r['baseline_anon'])} -> "
                    f"{mb(r['peak_anon'])} MB (+{mb(r['peak_anon'] - r['baseline_anon'])})",
                    flush=True,
                )
    if args.train_steps:
        largest = max(args.pairs)
        data = os.path.join(args.workdir, f"pairs-{largest}.jsonl")
        cache = os.path.join(args.workdir, f"cache-{largest}")
        trained = train(data, cache, args.workdir, args.train_steps, args.num_proc)
        print(
            f"trained {trained['steps']} steps on {largest:,} pairs (cached data): "
            f"{trained['wall']:.0f} s wall"
        )
        results.append({"train": {"pairs": largest, **trained}})
    if len(results) > 1 and "first" in results[0]:
        small, large = results[0], max((r for r in results if "first" in r), key=lambda r: r["pairs"])
        growth = large["first"][1]["peak_anon"] - small["first"][1]["peak_anon"]
        print(f"rank 1 peak RssAnon growth {small['pairs']:,} -> {large['pairs']:,} pairs: {mb(growth)} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    if "--worker" in sys.argv:  # a rank under the deepspeed launcher (it adds --local_rank)
        worker([a for a in sys.argv[1:] if a != "--worker"])
    else:
        main()
