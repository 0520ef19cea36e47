#!/usr/bin/env bash
# One lease's runs as a single background chain on the lent GPU, in the order given (the session's priorities), each
# writing under $KEEP as soon as it exists, so that a lease cut short keeps what came first. Parts:
#   answers  whole answers at ANSWER_LENGTHS (default decode_ab.sh's, 8K and 32K), dense / balanced / long /
#            transformers-static (decode_ab.sh answers; LENGTHS is the long part's)
#   long     TTFT and peak memory at 8K-128K, dense / balanced / long against transformers SDPA (long_prompts.py)
#   profile  a decoding step's kernels after a 32K prompt (decode_ab.sh profile)
#   prefill  short prompts' prefill under the profiler, lazyprefill against transformers (profile_stages.py)
#   check    check_gpu.py's sliding-window, block-sparse and continuation parts
#   shapes   what attention costs at a length it has not met: the engine's bucketed causal call, a continuation's
#            masked SDPA, FlexAttention compiled per shape against dynamic shapes (sdpa_new_shapes.py bucketed masked flex)
#   serve    serve_gpu.sh's SERVE_STEPS (default: prefix reuse at 16K, load, transformers serve, soak) into
#            $KEEP/$SERVE_DIR (default serve)
# On the device, started in the background by `lent_gpu.sh session PART...` (which sets the machine up first; bring
# results back with `lent_gpu.sh poll`, which packs /root/keep).
# Small on the CPU: MODEL=tiny LENGTHS=256,512 PROFILE_LENGTH=256 DEVICE=cpu KEEP=/tmp/keep \
#   PYTHON=.venv/bin/python benchmarks/gpu_session.sh long
set -uo pipefail
: "${KEEP:=/root/keep}" "${MODEL:=llama3-8b}" "${LENGTHS:=8192,32768,65536,131072}" "${PYTHON:=python3}"
: "${DEVICE:=cuda}" "${PROFILE_LENGTH:=32768}" "${STEM:=long-h200}"
OPTS='{"pattern_matcher": false}+selection'  # decoding's compile options since the seventh GPU session
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}  # this copy's engine first (decode_ab.sh sets its own)
mkdir -p "$KEEP/out"
for part in "$@"; do
    echo "== $part $(date -u +%T)"
    case $part in
    answers) OUT=$KEEP/out ROOT=$KEEP MODEL=$MODEL PYTHON=$PYTHON LENGTHS=${ANSWER_LENGTHS:-} \
                 bash benchmarks/decode_ab.sh answers pair="$OPTS" ;;
    long) "$PYTHON" benchmarks/long_prompts.py --model "$MODEL" \
              --lengths "$LENGTHS" --schedules dense,balanced,long --repeats 5 --warmup 2 --device "$DEVICE" \
              --out "$KEEP/long" --stem "$STEM" ;;
    profile) OUT=$KEEP/out ROOT=$KEEP MODEL=$MODEL PYTHON=$PYTHON PROFILE_LENGTH=$PROFILE_LENGTH \
                 bash benchmarks/decode_ab.sh profile pair="$OPTS" ;;
    prefill) for n in 512 4096; do
                 "$PYTHON" benchmarks/profile_stages.py --model "$MODEL" \
                     --length $n --methods dense --decode-steps 2 --warmup-steps 1 --profile-steps 1 --host-profile 20 \
                     > "$KEEP/prefill-$n.txt" 2>&1
             done ;;
    check) for only in windowed sparse continuation; do
               timeout 300 "$PYTHON" benchmarks/check_gpu.py "$only" \
                   > "$KEEP/check_gpu-$only.txt" 2>&1
               echo "check_gpu $only: rc $?"
           done ;;
    shapes) timeout 600 "$PYTHON" benchmarks/sdpa_new_shapes.py bucketed masked flex > "$KEEP/sdpa-new-shapes.txt" 2>&1 ;;
    serve) BENCH=benchmarks bash benchmarks/serve_gpu.sh "$KEEP/${SERVE_DIR:-serve}" ${SERVE_STEPS:-} ;;
    *) echo "unknown part $part: answers, long, profile, prefill, check, shapes or serve" >&2 ;;
    esac
    echo "== $part done rc $? $(date -u +%T)"
done
