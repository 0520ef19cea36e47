#!/usr/bin/env bash
# Accuracy of the embedded gemma3-270m at 2K, 4K and 8K tokens, run on a GPU in fp32 (issues 11 and 12).
#
# A GPU only makes the runs fit in a session: the 270M model's GPU TTFT says nothing about its CPU TTFT,
# which results/README.md measures on the CPU. Four processes share the GPU:
#   - tune on the calibration split (4K and 8K; layers 5 and 11, the full-attention ones), for a 5%
#     and a 1% target, then the two chosen schedules on the evaluation split;
#   - the evaluation split at each length: dense, the presets, the scorers at the paper's work, and
#     static and random at the paper's keep counts.
# Every process streams its records (JSONL): a run stopped early is rebuilt with `eval --report-only`
# or finished with `eval --resume` (the same command plus --resume).
#
# Usage: benchmarks/gemma_accuracy.sh OUT_DIR [SAMPLES_PER_TASK]
set -uo pipefail
out=${1:?usage: gemma_accuracy.sh OUT_DIR [SAMPLES_PER_TASK]}
n=${2:-60}
mkdir -p "$out"
gpu=(--model gemma3-270m --device cuda --dtype float32 --threads 2 --cache "$out/dense-cache")
pool="pool(k=7, of=window(w=16))"
scorers="last, $pool, protect(sink=4, recent=16, of=$pool)"

lazyprefill() { python3 -m lazyprefill "$@"; }  # a source checkout has no installed script

tune_then_eval() {
    local t=(tune "${gpu[@]}" --tasks passkey,recall,code --lengths 4096,8192 --samples 15 --scorers "$scorers"
             --fractions 0.3,0.62 --ratios 0.7,0.5,0.3,0.2,0.1 --eval-samples "$n" --work-dir "$out/tune")
    lazyprefill "${t[@]}" --target-loss 0.05 --out "$out/tune/fast.json"
    lazyprefill "${t[@]}" --target-loss 0.01 --out "$out/tune/balanced.json"
    local chosen=()
    for f in "$out"/tune/fast.json "$out"/tune/balanced.json; do [ -f "$f" ] && chosen+=("$f"); done
    [ ${#chosen[@]} -gt 0 ] || return 0
    local list
    list=$(IFS=,; echo "${chosen[*]}")
    lazyprefill eval "${gpu[@]}" --tasks passkey,recall,code --samples "$n" --lengths 2048,4096,8192 \
        --split evaluation --schedules "$list" --baselines none --out "$out/eval-tuned"
}

tune_then_eval >"$out/tune.log" 2>&1 &
for length in 2048 4096 8192; do
    lazyprefill eval "${gpu[@]}" --tasks passkey,recall,code --samples "$n" --lengths "$length" --split evaluation \
        --schedules "paper, balanced, $pool:paper, protect(sink=4, recent=16, of=$pool):paper" \
        --baselines paper --out "$out/eval-$length" >"$out/eval-$length.log" 2>&1 &
done
wait
