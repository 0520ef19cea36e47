#!/usr/bin/env bash
# The lent GPU's routine (benchmarks/NOTES.md, "Third GPU session"): the device has torch, transformers and triton but
# no model weights and no package index, a call carries at most 64 MiB with the repository's tracked files (36 MB at
# the fifth GPU session), $OUT is emptied before every command, and the machine is given back 30 s after a call ends.
# So the 253 MB Gemma 3 GGUF goes in pieces as large as a call can carry beside the tracked files (9 of 29 MB then),
# one call each; code and results live under /root, outside the repository's copy; background runs start with setsid;
# and a run is kept alive by calls that wait and bring back what it wrote (`poll`).
#
#   benchmarks/lent_gpu.sh prepare             # here, once per checkout: what `session` carries, .gpu/tok (SmolLM2's
#                                              # tokenizer) and .whl-serve (the server's and the client's packages)
#   benchmarks/lent_gpu.sh split               # here, once, for Gemma 3: `prepare`, .gpu/c0..cN (GGUF pieces; it
#                                              # prints N), .whl (gguf, rapidfuzz)
#   run: benchmarks/lent_gpu.sh setup          # carry .gpu/cN .whl; wheels, code to /root/src, the last piece (or
#                                              # carry .whl alone, beside `session`'s carry, and send cN as a piece)
#   run: benchmarks/lent_gpu.sh piece I        # carry .gpu/cI; I = 0..N-1, one call each, back to back
#   run: benchmarks/lent_gpu.sh assemble       # carry .whl-serve; the GGUF from its pieces, checked, converted once
#                                              # (about 2 minutes; start the evaluations in the same call, and keep
#                                              # a call running while they do: the machine goes back 30 s after one;
#                                              # samples an earlier lease finished: split_eval.py, then --resume)
#   run: benchmarks/lent_gpu.sh poll 540       # wait, then bring back /root/keep as $OUT/keep.tgz
#   run: benchmarks/lent_gpu.sh session PART.. # carry .gpu/tok .whl-serve: runs on model shapes need no GGUF; the
#                                              # serving wheels, the tokenizer, the code in /root/w, then
#                                              # gpu_session.sh PART.. in the background; follow with `poll`
# Runs on the device take `source /root/env.sh` and write under /root/keep; start at most 6 GPU processes at once.
set -euo pipefail
GGUF=gemma-3-270m-q4_k_m.gguf
write_env() {
    echo "export PYTHONPATH=/root/site:/root/src LAZYPREFILL_CACHE=/root/cache HF_HUB_OFFLINE=1" \
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false" > /root/env.sh
}
prepare() {  # the ignored files that `session` carries (a fresh checkout has none), kept out of git's status
    local python=$1
    $python -m pip download -q -d .whl-serve --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 fastapi uvicorn prometheus-client openai httpx
    [[ -f .gpu/tok/tokenizer.json ]] || $python benchmarks/shape_checkpoint.py --tokenizer-only smollm2 --out .gpu/tok
    mkdir -p .git/info
    for ignored in /.gpu/ /.whl/ /.whl-serve/; do
        grep -qsx "$ignored" .git/info/exclude || echo "$ignored" >> .git/info/exclude
    done
}
install_serving() {  # the server's and the client's packages, carried in .whl-serve
    pip install -q --no-index --target /root/site --find-links .whl-serve fastapi uvicorn prometheus-client openai httpx
}
case "${1:?usage: lent_gpu.sh prepare | split | setup | piece N | assemble | poll SECONDS | session PART...}" in
split)
    python=${PYTHON:-.venv/bin/python}  # with torch: lazyprefill.models imports it
    src=$(PYTHONPATH=src $python -c "from lazyprefill.models import fetch_embedded; print(fetch_embedded('gemma3-270m'))")
    mkdir -p .gpu .whl
    $python -m pip download -q --no-deps -d .whl --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 gguf rapidfuzz
    tracked=$(git ls-files -z | xargs -0 cat | wc -c)
    wheels=$(cat .whl/*.whl | wc -c)  # setup carries them with the last piece, which may be nearly full
    piece=$((64 * 1024 * 1024 - tracked - wheels - 2000000))  # and room for what lands meanwhile
    rm -rf .gpu/c[0-9]*
    (cd .gpu && split -b "$piece" -d -a 2 "$src" p && for f in p[0-9][0-9]; do n=$((10#${f#p})); mkdir -p "c$n" && mv "$f" "c$n/"; done)
    echo "pieces of $piece bytes: setup carries .gpu/c$(($(ls -d .gpu/c[0-9]* | wc -l) - 1))"
    prepare "$python"
    ;;
prepare)
    prepare "${PYTHON:-.venv/bin/python}"  # with transformers and the embedded SmolLM2
    ;;
setup)
    mkdir -p /root/store /root/keep /root/site
    shopt -s nullglob
    carried=(.gpu/c[0-9]*/p[0-9][0-9])  # the piece carried with this call, if any (else `piece N` brings it)
    ((${#carried[@]} == 0)) || cp "${carried[@]}" /root/store/
    pip install -q --no-index --no-deps --target /root/site .whl/*.whl
    rm -rf /root/src /root/bench && cp -r src /root/src && cp -r benchmarks /root/bench
    write_env
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    ;;
piece)
    cp ".gpu/c${2:?piece number}"/p[0-9][0-9] /root/store/ && ls /root/store | tr '\n' ' '
    ;;
assemble)
    source /root/env.sh
    install_serving
    mkdir -p /root/cache/v1/gemma3-270m
    cat $(ls /root/store/p* | sort -V) > "/root/cache/v1/gemma3-270m/$GGUF"
    cd /root && python3 -c "from lazyprefill.models import converted_embedded; print(converted_embedded('gemma3-270m'))"
    ;;
session)
    shift
    mkdir -p /root/keep /root/site
    install_serving
    rm -rf /root/tok /root/w && cp -r .gpu/tok /root/tok && mkdir /root/w && cp -r src benchmarks /root/w/
    write_env
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    cd /root/w && source /root/env.sh
    setsid nohup bash benchmarks/gpu_session.sh "$@" > /root/keep/session.log 2>&1 < /dev/null &
    ;;
poll)
    sleep "${2:-0}"
    cd /root/keep
    shopt -s nullglob
    for f in *.log; do echo "== $f"; tail -c 400 "$f" | tr '\r' '\n' | grep -av '^$' | tail -1 || true; done
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader || true
    tar czf "$OUT/keep.tgz" --exclude='dense-*' --exclude='checkpoint-*' .
    ;;
esac
