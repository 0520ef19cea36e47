#!/usr/bin/env bash
# Priority 1 on the lent GPU (benchmarks/NOTES.md, "Decoding steps, fourth GPU session"): a pruned decoding step
# against a dense one under several settings of what decoding compiles, one call per part, every output packed
# into $OUT/PART.tgz (a call brings back at most 8 files). Each ARM is NAME=OPTIONS_JSON, Inductor's options for the
# compiled layer halves (decoding.COMPILE_OPTIONS), with "+selection" to compile the selection too
# (decoding.COMPILE_SELECTION). The static cache runs beside the first arm. NAME@DIR runs the arm on the engine in
# DIR instead of src: an earlier commit's, carried, e.g. `mkdir -p .ab/C && git archive C src | tar -x -C .ab/C`, then
# before@.ab/C/src='{...}' (.ab/ is ignored).
#
#   run: benchmarks/decode_ab.sh profile A='{}' B='{"pattern_matcher": false}' C='{}+selection'  # ~1.5 min an arm
#                                     # (after an 8K prompt; PROFILE_LENGTH=32768 for another)
#   run: benchmarks/decode_ab.sh answers A='{}' C='{}+selection'  # whole answers at 8K and 32K, ROUNDS=3 rounds
#                                     # (methods taking turns): ~5 min an arm, so one arm a call near the 10-minute limit
set -uo pipefail
part=${1:?usage: decode_ab.sh profile|answers NAME[@SRC_DIR]=OPTIONS_JSON[+selection]...}
shift
[ $# -gt 0 ] || { echo "name at least one arm: NAME[@SRC_DIR]=OPTIONS_JSON[+selection]" >&2; exit 2; }
: "${MODEL:=llama3-8b}" "${LENGTHS:=8192,32768}" "${ROUNDS:=3}" "${ROOT:=/root}" "${PYTHON:=python3}"
: "${PROFILE_LENGTH:=8192}"  # the prompt a profile decodes after (answers take LENGTHS)
k=$((PROFILE_LENGTH / 1024))k
# the CPU: MODEL=tiny LENGTHS=256 ROUNDS=2 PYTHON=.venv/bin/python OUT=... ROOT=...
dir=$ROOT/$part && rm -rf "$dir" && mkdir -p "$dir"
first=1
for arm in "$@"; do
    name=${arm%%=*} opts=${arm#*=} selection=--no-compile-selection engine=src
    if [[ $name == *@* ]]; then engine=${name#*@} name=${name%%@*}; fi
    export PYTHONPATH=$engine
    if [[ $opts == *+selection ]]; then opts=${opts%+selection} selection=--compile-selection; fi
    echo "$name $opts $selection $engine" >> "$dir/arms.txt"
    case $part in
    profile)
        "$PYTHON" benchmarks/profile_stages.py --model "$MODEL" --no-prefill --length "$PROFILE_LENGTH" \
            --methods 'dense,revive(rows=1):balanced,balanced' --compile-options "$opts" $selection \
            --json "$dir/steps-$k-$name.json" --kernel-table "$dir/kernels-$k-$name.txt" > "$dir/profile-$k-$name.txt" 2>&1
        grep -h "^decode .*median" "$dir/profile-$k-$name.txt" | sed "s/^/$name /"
        ;;
    answers)
        static=() && [ $first = 1 ] && static=(transformers-static,)
        "$PYTHON" benchmarks/answers.py --models "$MODEL" --lengths "$LENGTHS" --batch-sizes 1 \
            --methods "${static[*]}dense,balanced,long" --rounds "$ROUNDS" --compile-options "$opts" $selection --out "$dir" \
            --stem "answers-$MODEL-$name" > "$dir/log-$name.txt" 2>&1
        grep -h "^| [0-9]" "$dir/answers-$MODEL-$name.md" | sed "s/^/$name /"
        ;;
    *) echo "unknown part $part: profile or answers" >&2; exit 2 ;;
    esac
    first=0
    tar czf "$OUT/$part.tgz" -C "$ROOT" "$part"  # after every arm: what a call cut short had made comes back
done
