#!/usr/bin/env bash
# The wheels bench/gpu_check.py carries to a GPU machine without network (docs/benchmarks.md "GPU check"):
# what its image (Python 3.12, torch 2.11, an older transformers) lacks, at the versions of
# requirements/cpu.lock. DeepSpeed is built here into a pure-Python wheel (no ops compiled: DS_BUILD_OPS=0).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
py=${PYTHON:-.venv/bin/python}
rm -rf "$out" && mkdir -p "$out"
pin() { grep -i "^$1==" requirements/cpu.lock | head -1; }
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$(pin deepspeed)"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
# huggingface-hub stays the image's (1.33 >= transformers' 1.31; ours, 2.4, would need httpx2 too)
for name in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions transformers tokenizers; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$out" "$(pin "$name")"
done
du -sh "$out"
ls "$out"
