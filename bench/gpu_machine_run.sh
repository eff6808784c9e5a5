#!/usr/bin/env bash
# The GPU machine's whole benchmark session in one go, in the order that keeps measurements clean:
# the GPU tests, then llama-bench built with nothing else running, then per model: generate, convert the
# experts, and `tierserve bench` against llama.cpp.
#
#   bench/gpu_machine_run.sh LLAMA_CPP_SOURCE OUT_DIR [DTYPE:BUDGET[:ROUTING_SKEW] ...]
#
# LLAMA_CPP_SOURCE is llama.cpp's source tree (e.g. vendor/llama.cpp of the llama-cpp-python sdist, see
# bench/README.md); the default models are qwen3-30b-a3b in q4_0 with a 4 GB expert budget, then q8_0 with 8 GB,
# both at routing skew 1.0 (e.g. bf16:16GB:0 for bf16 experts, a 16 GB budget and uniform routing).
# Each model is deleted after its run: the two with their expert caches would not fit a 64 GB disk together.
# SWEEP=10,25,50,100 adds the VRAM budget sweep (the system started once per budget: minutes per point on 30B).
# On a 64 GB disk a q8_0 model (32 GB) and its expert cache (32 GB) do not fit together: MODELS=/dev/shm/models
# keeps both in RAM (tmpfs), which the expert hosts then map without a second copy.
# NATIVE_BEFORE=FILE also times the expert hosts' kernel against that earlier grouped_ffn.c (bench/native_ab.py).
set -euo pipefail
LLAMA_SRC=${1:?llama.cpp source directory}
OUT=${2:?output directory}
shift 2
RUNS=("$@")
[ ${#RUNS[@]} -eq 0 ] && RUNS=(q4_0:4GB q8_0:8GB)
TS="python3 -m shared.cli"
MODELS=${MODELS:-/tmp/tierserve-models}
BUILD=${BUILD:-/tmp/llama-build}
mkdir -p "$OUT" "$MODELS"
start=$SECONDS
stamp() { echo "[$((SECONDS - start)) s] $*"; }

python3 -m pytest -m gpu tests/gpu -p no:cacheprovider -q > "$OUT/gpu_tests.log" 2>&1 || true
stamp "gpu tests: $(tail -1 "$OUT/gpu_tests.log")"

# the kernels alone: the int4 ring at its default depth and at 3, and (NATIVE_BEFORE=an earlier grouped_ffn.c)
# the expert hosts' kernel against that version in one process, at one host's default threads and every core
python3 -m bench.quant_kernels_bench --out "$OUT/quant_kernels.md" > /dev/null 2>&1 || true
python3 -m bench.quant_kernels_bench --formats int4 --int4-stages 3 --out "$OUT/quant_kernels_int4_stages3.md" \
  > /dev/null 2>&1 || true
if [ -n "${NATIVE_BEFORE:-}" ]; then
  python3 -m bench.native_ab "$NATIVE_BEFORE" --threads "13,$(nproc)" > "$OUT/native_ab.md" 2>&1 || true
fi
stamp "kernel benchmarks done"

cmake -S "$LLAMA_SRC" -B "$BUILD" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  > "$OUT/llama_build.log" 2>&1
cmake --build "$BUILD" --target llama-bench -j "$(nproc)" >> "$OUT/llama_build.log" 2>&1
stamp "llama-bench built"

for run in "${RUNS[@]}"; do
  IFS=: read -r dtype budget skew <<< "$run"
  skew=${skew:-1.0}
  model="$MODELS/qwen3-30b-a3b-$dtype.gguf"
  $TS make-model "$model" --preset qwen3-30b-a3b --dtype "$dtype" --routing-skew "$skew" --seed 0
  $TS convert-experts "$model"
  stamp "$dtype model and expert cache ready"
  $TS bench --model "$model" --expert-budget "$budget" --expert-hosts 1 --soft-slots 64 --cold-path auto \
    --profile-steps 8 ${SWEEP:+--budget-sweep "$SWEEP"} --llama-cpp "$BUILD" --out "$OUT/$dtype-skew$skew" \
    > "$OUT/$dtype-skew$skew.log" 2>&1 || true
  stamp "$dtype bench done"
  rm -f "$MODELS"/qwen3-30b-a3b-"$dtype".*
done
