"""bench/gpu_check.py runs end to end on CPU with tiny shapes (--smoke), so the command a GPU machine
runs is the one tested here: its report's checks pass and its numbers are consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_report(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, MASTER_PORT=str(29400 + os.getpid() % 500))
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench/gpu_check.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == []
    packed = report["packed_equals_unpacked"]
    assert packed["torch_varlen/bfloat16"] == {"ran": False, "why": packed["torch_varlen/bfloat16"]["why"]}
    assert "needs CUDA" in packed["torch_varlen/bfloat16"]["why"]
    fp32 = packed["sdpa_packed/float32"]
    assert fp32["ran"] and fp32["ok"] and fp32["max_abs"] <= 1e-4 and fp32["tokens"] > 500
    assert report["bf16_against_fp32"]["grad_cosine"] > 0.99
    step = report["dpo_step_1b"]
    assert step["flop_params"] > 0 and step["peak_source"] == "measured: cpu float32 matmul"
    for name in ("online_reference", "cached_reference", "fused_head_cached_reference"):
        run = step[name]
        assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1 and run["predicted_peak_gib"] > 0
        assert sum(run["time_split_s"].values()) <= run["step_s"]
    assert step["online_reference"]["time_split_s"]["reference"] > 0
    # the cached runs read the stored values: no reference forward
    assert (
        step["cached_reference"]["time_split_s"]["reference"]
        < step["online_reference"]["time_split_s"]["reference"]
    )
    assert "all checks passed" in done.stdout
