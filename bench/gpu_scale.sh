#!/usr/bin/env bash
# Issue 21 on one H200: `kvlink-bench scale` for the 8B and 32B geometries (random weights: timing only)
# at 8k and 32k tokens, and the 8B at 128k, over unpaced/100G/25G/10G/1G links, text vs FP16 vs
# INT4 g64 (28%) vs Q2C 50% + INT4 (14%) vs Q2C 25% + INT4 (7%).
#
# 1. Here (the CPU machine, repository root), once:   bash bench/gpu_scale.sh prep
#    -> .carry/scale/ (~15 MB, git-ignored): the Python 3.12 wheels the device lacks (pinned to the
#    versions CI uses, httpx and opentelemetry-api included), the embedded model's TOKENIZER alone
#    (3.5 MB, KVLINK_RANDOM_TOKENIZER: random:... models need nothing else of it, so neither the 93 MB
#    model wheel nor its two-call carry), and the proto stubs with their grpcio guard lowered to 1.84.
# 2. Two device calls, each self-sufficient (it installs what it needs in ~20 s, then runs):
#      run(kind="nvidia-h200", timeout_s=600, carry=[".carry/scale"], command="bash bench/gpu_scale.sh 1")
#      run(timeout_s=600, carry=[".carry/scale"], command="bash bench/gpu_scale.sh 2")
#    Call 2 resumes call 1: from /root/kvlink-scale if the machine is still warm, else from
#    .carry/scale/resume/, where you copy call 1's $OUT/scale/{cells,contexts}.jsonl and run.json first:
#      mkdir -p .carry/scale/resume && cp <files_at>/scale/{cells.jsonl,contexts.jsonl,run.json} .carry/scale/resume/
#    Each call returns $OUT/log and $OUT/scale/{cells.jsonl,contexts.jsonl,run.json,results.json,results.md,ttft.png}.
#    Commit the last call's scale/ as bench/results/scale-h200/ (with this script's name in its README).
#
# Time (estimated from the CPU stand-ins, bench/results/scale-cpu/README.md): per cell ~2 s of fixed cost
# (the receiver's context expiring, the proxy, the REST reads, the question) plus ~1.1 s per GB encoded,
# packed, assembled and decoded, plus the wire time (at most 10 s: --max-paced-s extrapolates slower
# paced cells from their unpaced twin, flagged "*"). ~100 cells over ~33 GB of messages: ~8-10 min of
# cells plus ~1 min of set-up per model (load, text re-prefill and sender prefill per length, receiver
# start) -- two calls. --time-budget stops starting cells 50 s before the call's end; --resume goes on.
# FP16 at 128k (17 GB per message, ~2.5 min per link) is left out: it is linear in the 32k figures.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARRY=.carry/scale
WORK=/root/kvlink-scale

prep() {
  local py=${PYTHON:-.venv/bin/python}  # the Makefile's virtual environment (make install)
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/tokenizer" "$CARRY/proto"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" \
    zstandard==0.25.0 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 typing-extensions==4.16.0 \
    opentelemetry-api==1.45.2 uvicorn==0.55.0 h11==0.16.0 click==8.5.1 anyio==4.16.0 idna==3.20 \
    prometheus-client==0.26.0 google-crc32c==1.9.0 platformdirs==4.14.9 rich==15.0.0 markdown-it-py==4.3.0 \
    mdurl==0.1.2 pygments==2.21.0 httpx==0.29.0 httpcore==1.0.9 certifi==2026.10.19.post1 \
    grpcio-health-checking==1.84.0
  # The embedded tokenizer alone, as this machine's transformers saved it (the fingerprint's tokenizer).
  PYTHONPATH=$PWD "$py" -c "
import sys
from kvlink.models import load_model
load_model('random:tiny-llama').tokenizer.save_pretrained(sys.argv[1])" "$CARRY/tokenizer"
  # The stubs are git-ignored (they do not travel); grpcio-tools here is newer than the device's grpcio 1.84.
  PYTHONPATH=$PWD "$py" -c "import kvlink.wire" >/dev/null
  cp kvlink/_proto/kvlink_pb2.py kvlink/_proto/kvlink_pb2.pyi kvlink/_proto/kvlink_pb2_grpc.py "$CARRY/proto/"
  sed -i "s/^GRPC_GENERATED_VERSION = .*/GRPC_GENERATED_VERSION = '1.84.0'/" "$CARRY/proto/kvlink_pb2_grpc.py"
  du -sh "$CARRY" "$CARRY"/*
  echo "now: run(carry=[\"$CARRY\"], command=\"bash bench/gpu_scale.sh 1\"), then ... 2 (see this script's header)"
}

setup() {  # on the device
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site "$CARRY"/wheels/*.whl
  for f in kvlink_pb2.py kvlink_pb2.pyi kvlink_pb2_grpc.py; do
    [ -f "kvlink/_proto/$f" ] || cp "$CARRY/proto/$f" kvlink/_proto/
  done
  touch kvlink/_proto/kvlink_pb2*  # newer than the proto: never regenerated (no grpcio-tools there)
  export PYTHONPATH=/root/site:$PWD KVLINK_RANDOM_TOKENIZER=$PWD/$CARRY/tokenizer PYTHONUNBUFFERED=1
  export KVLINK_CACHE=/root/kvlink-cache
  mkdir -p "$WORK"
  if [ ! -s "$WORK/cells.jsonl" ] && [ -d "$CARRY/resume" ]; then cp "$CARRY"/resume/* "$WORK/"; fi
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
  python3 -c "import torch, transformers, grpc; print(torch.__version__, transformers.__version__, grpc.__version__)"
}

bench() {  # bench <seconds left at the start of the call> <kvlink-bench scale args...>
  local end=$1; shift
  local left=$(( end - $(date +%s) - 50 ))
  if [ "$left" -lt 60 ]; then echo "no time left for: $*"; return 0; fi
  timeout $(( left + 40 )) python3 -m kvlink.eval.cli scale --out "$WORK" --resume --device cuda \
    --time-budget "$left" --cell-timeout 180 --max-paced-s 10 --links unpaced,100G,25G,10G,1G "$@" \
    || echo "kvlink-bench scale exited $? (resumable)"
}

run_part() {
  local end=$(( $(date +%s) + ${BUDGET_S:-560} ))
  setup
  bench "$end" --model random:llama-3.1-8b --tokens 8k,32k --planner
  bench "$end" --model random:qwen2.5-32b --tokens 8k,32k
  bench "$end" --model random:llama-3.1-8b --tokens 128k --methods text,int4,q2c50-int4,q2c25-int4
  python3 -m kvlink.eval.cli scale --out "$WORK" --report-only > /dev/null || true
  mkdir -p "$OUT/scale"
  cp "$WORK"/{cells.jsonl,contexts.jsonl,run.json,results.json,results.md,ttft.png} "$OUT/scale/" 2>/dev/null || true
  echo "$(wc -l < "$WORK/cells.jsonl") cells in $WORK/cells.jsonl (about 110 when all are done)"
}

case "${1:-}" in
  prep) prep ;;
  1|2) set -o pipefail; run_part 2>&1 | tee "${OUT:-/tmp}/log" ;;
  *) echo "usage: bash bench/gpu_scale.sh prep|1|2 (see the header)"; exit 2 ;;
esac
