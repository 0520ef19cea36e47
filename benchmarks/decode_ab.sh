#!/usr/bin/env bash
# Priority 1 on the lent GPU (benchmarks/NOTES.md, "Decoding steps, fourth GPU session"): a pruned decoding step
# against a dense one with Inductor's defaults (A) and with OPTIONS (B) for the compiled layer halves, in one call
# each, every output packed into $OUT/PART.tgz (a call brings back at most 8 files).
#
#   run: benchmarks/decode_ab.sh profile '{"pattern_matcher": false}'   # ~4 min: per-kernel tables at 8K, both
#   run: benchmarks/decode_ab.sh answers '{"pattern_matcher": false}'   # ~6 min: whole answers at 8K and 32K, both
set -uo pipefail
part=${1:?usage: decode_ab.sh profile|answers OPTIONS_JSON}
options=${2:?OPTIONS_JSON}
: "${MODEL:=llama3-8b}" "${LENGTHS:=8192,32768}" "${ROOT:=/root}" "${PYTHON:=python3}"  # the CPU: MODEL=tiny LENGTHS=256
dir=$ROOT/$part && rm -rf "$dir" && mkdir -p "$dir"
export PYTHONPATH=src
case $part in
profile)
    for ab in A B; do
        opts='{}' && [ $ab = B ] && opts=$options
        "$PYTHON" benchmarks/profile_stages.py --model "$MODEL" --no-prefill --length 8192 \
            --methods 'dense,revive(rows=1):balanced,balanced' --compile-options "$opts" --json "$dir/steps-8k-$ab.json" \
            --kernel-table "$dir/kernels-8k-$ab.txt" > "$dir/profile-8k-$ab.txt" 2>&1
        grep -h "^decode .*median" "$dir/profile-8k-$ab.txt" | sed "s/^/$ab /"
        (cd benchmarks && PYTHONPATH=../src "$PYTHON" copy_sources.py --model "$MODEL" --length 4096 \
            --methods dense,balanced --compile-options "$opts") > "$dir/copy-sources-$ab.txt" 2>&1
    done
    ;;
answers)
    for ab in A B; do
        opts='{}' && [ $ab = B ] && opts=$options
        static=() && [ $ab = A ] && static=(transformers-static,)
        "$PYTHON" benchmarks/answers.py --models "$MODEL" --lengths "$LENGTHS" --batch-sizes 1 \
            --methods "${static[*]}dense,balanced,long" --compile-options "$opts" --out "$dir" \
            --stem "answers-$MODEL-$ab" > "$dir/log-$ab.txt" 2>&1
        grep -h "^| [0-9]" "$dir/answers-$MODEL-$ab.md" | sed "s/^/$ab /"
    done
    ;;
*) echo "unknown part $part: profile or answers" >&2; exit 2 ;;
esac
echo "$options" > "$dir/options.json"
tar czf "$OUT/$part.tgz" -C "$ROOT" "$part"
