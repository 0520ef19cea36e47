#!/usr/bin/env bash
# Issue 25 on the lent GPU, as one background job whose every result is written as soon as it exists. Steps, in the
# order given (all but probe by default); those that start a server build the servable llama3-8b-shaped checkpoint with
# SmolLM2's tokenizer first if it is not there (shape_checkpoint.py):
#   reuse        a follow-up question's TTFT over a 16K-token document against a fresh request (prefix_reuse.py);
#   load         one Poisson trace of 8K-32K-token documents (windows of Python drawn by their length in the
#                checkpoint's tokens, so that none is over MAX_PROMPT) on lazyprefill's LOAD_SCHEDULES
#                (`balanced`, then dense) (serve_load.py), each started with SERVER_ARGS (e.g. --decode=graphs=off);
#   transformers the same trace on `transformers serve --continuous-batching`;
#   probe        lone requests of about PROBE_LENGTHS tokens, each of a new length, through the scheduler against
#                the same prompt again through `LazyLLM.generate`, dense, `balanced` and `long` (serve_probe.py:
#                does a new length or the scheduler cost a pruned prefill more than a dense one?);
#   soak         a 10-minute soak of `balanced` on the same kind of trace (every request finished, memory after
#                warm-up and at the end).
# On the device, after `lent_gpu.sh setup` and `assemble`, with the tokenizer's files carried in .gpu/tok
# (`shape_checkpoint.py --tokenizer-only smollm2 --out .gpu/tok`):
#   cp -r .gpu/tok /root/tok && source /root/env.sh && cd /root && \
#     setsid nohup bash bench/serve_gpu.sh /root/keep/serve > /root/keep/serve.log 2>&1 < /dev/null &
# The sizes are variables, so that the same steps run small on the CPU:
#   SHAPE=tiny CKPT=/tmp/ckpt-tiny DEVICE=cpu DTYPE=float32 TOKENIZER=.gpu/tok LENGTH=1024 MIN_TOKENS=500 MAX_TOKENS=1000 \
#     MAX_PROMPT=2048 RATE=0.5 DURATION=20 SOAK=20 BENCH=benchmarks benchmarks/serve_gpu.sh /tmp/serve-smoke
set -euo pipefail
out=${1:?usage: serve_gpu.sh OUT_DIR [reuse|load|transformers|soak ...]}
shift
steps=("$@")
((${#steps[@]})) || steps=(reuse load transformers soak)
: "${SHAPE:=llama3-8b}" "${DEVICE:=cuda}" "${DTYPE:=bfloat16}" "${TOKENIZER:=/root/tok}" "${BENCH:=bench}"
: "${LENGTH:=16384}" "${MIN_TOKENS:=8192}" "${MAX_TOKENS:=32768}" "${MAX_PROMPT:=34000}" "${NEW_TOKENS:=64}"
: "${PROBE_LENGTHS:=4096,8192,16384,32768}"
: "${RATE:=0.3}" "${DURATION:=180}" "${SOAK:=600}" "${PORT:=8400}" "${LOAD_SCHEDULES:=balanced,dense}"
: "${CKPT:=/root/checkpoint-$SHAPE}"  # outside OUT_DIR: polls bring OUT_DIR back, not 15 GB of weights
mkdir -p "$out"
ckpt=$CKPT

checkpoint() {  # built aside and moved into place whole, so that one cut off midway is never taken for complete
    [[ -d $ckpt ]] && return
    rm -rf "$ckpt.partial"
    python3 "$BENCH/shape_checkpoint.py" --shape "$SHAPE" --tokenizer "$TOKENIZER" --device "$DEVICE" \
        --dtype "$DTYPE" --out "$ckpt.partial"
    mv "$ckpt.partial" "$ckpt"
}
load=(--model "$ckpt" --device "$DEVICE" --dtype "$DTYPE" --max-prompt-tokens "$MAX_PROMPT" --min-tokens "$MIN_TOKENS"
      --max-tokens "$MAX_TOKENS" --new-tokens "$NEW_TOKENS" --rate "$RATE")
healthy() { python3 -c "import urllib.request; urllib.request.urlopen('http://localhost:$PORT/health', timeout=2)" 2>/dev/null; }

for step in "${steps[@]}"; do
    echo "== serve step $step $(date -u +%T)"
    case $step in
    reuse) python3 "$BENCH/prefix_reuse.py" --model "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --lengths "$LENGTH" \
               --schedules dense,balanced --out "$out" --stem "prefix-reuse-$SHAPE" ;;
    load) checkpoint
          read -ra extra <<< "${SERVER_ARGS:-}"
          python3 "$BENCH/serve_load.py" "${load[@]}" --duration "$DURATION" --schedules "$LOAD_SCHEDULES" \
              "${extra[@]/#/--server-arg=}" --out "$out/load" ;;
    transformers)
        checkpoint
        transformers serve "$ckpt" --continuous-batching --device "$DEVICE" --dtype "$DTYPE" --port "$PORT" &
        server=$!
        trap 'kill $server 2>/dev/null || true' EXIT
        for _ in $(seq 120); do healthy && break; sleep 2; done
        healthy || { echo "transformers serve did not come up on port $PORT" >&2; exit 1; }
        python3 "$BENCH/serve_load.py" "${load[@]}" --duration "$DURATION" --schedules "" \
            --url "transformers-serve=http://localhost:$PORT" --out "$out/load-transformers"
        kill $server 2>/dev/null || true
        wait $server || true  # its GPU memory is free before the soak reads the device's
        trap - EXIT ;;
    probe) python3 "$BENCH/serve_probe.py" --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
               --lengths "$PROBE_LENGTHS" --schedules dense,balanced,long --out "$out" ;;
    soak) checkpoint
          python3 "$BENCH/serve_load.py" "${load[@]}" --duration "$SOAK" --schedules balanced --out "$out/soak" ;;
    *) echo "unknown step $step: reuse, load, transformers, probe or soak" >&2; exit 2 ;;
    esac
done
