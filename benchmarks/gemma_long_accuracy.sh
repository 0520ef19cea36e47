#!/usr/bin/env bash
# Accuracy of the embedded gemma3-270m at 16K and 32K tokens on a GPU in fp32 (issue 24): dense, the `long`
# preset, and static and random pruning at long's work (its keep counts; Gemma 3's `long` attends densely since the
# 16K run in results/gemma3-270m-gpu-16384-parts).
#
# One process per task, all sharing one GPU and one dense-result cache; each streams its records (JSONL), so a
# run stopped by a lease's end is finished later with the same command plus --resume (or rebuilt with
# `lazyprefill eval --report-only --out OUT_DIR/LENGTH-TASK`). A 32K prompt's prefill peaks near 4 GB in fp32 since
# attention.sdpa sends its full-attention layers to the memory-efficient kernel (44 GB on SDPA's math path before),
# but 15 evaluation processes started at once still ran an H100 out of memory in their first minutes (11 of them
# died), and a 32K process holds about 18 GiB once warm: this script starts one per task, so run at most two at
# 32K (four at 16K and under; PARALLEL below) and no other evaluation beside it.
# The prompt and its answer must fit Gemma 3's 32,768 positions: use 32512 for "32K".
# On the lent GPU, OUT_DIR must lie outside $OUT, which is emptied before every command (e.g. /root/keep), and the
# processes started with setsid, so that they outlive the call that starts them (benchmarks/NOTES.md).
#
# Usage: benchmarks/gemma_long_accuracy.sh OUT_DIR LENGTH SAMPLES TASKS [--resume]
#   e.g. benchmarks/gemma_long_accuracy.sh /root/keep 16384 100 passkey,recall,code,niah_single,niah_multikey
# Other schedules: SCHEDULES='long, SPEC' BASELINES=none TAG=candidates (output folders LENGTH-TASK-TAG).
# PARALLEL=N runs at most N of the tasks at once, starting the next as one ends (an H100 held three 16K and two 32K
# processes: `PARALLEL=3 ... 16384 ... & PARALLEL=2 ... 32512 ... &`).
set -uo pipefail
out=${1:?usage: gemma_long_accuracy.sh OUT_DIR LENGTH SAMPLES TASKS [--resume]}
length=${2:?LENGTH}
samples=${3:?SAMPLES}
tasks=${4:?TASKS}
resume=${5:-}
: "${SCHEDULES:=long}" "${BASELINES:=long}" "${TAG:=}" "${PARALLEL:=99}"
mkdir -p "$out"
gpu=(--model gemma3-270m --device cuda --dtype float32 --threads 2 --cache "$out/dense-cache")

for task in ${tasks//,/ }; do
    while (($(jobs -rp | wc -l) >= PARALLEL)); do wait -n || true; done
    python3 -m lazyprefill eval "${gpu[@]}" --tasks "$task" --samples "$samples" --lengths "$length" \
        --split evaluation --schedules "$SCHEDULES" --baselines "$BASELINES" --out "$out/$length-$task${TAG:+-$TAG}" \
        $resume >"$out/$length-$task${TAG:+-$TAG}.log" 2>&1 &
done
wait
