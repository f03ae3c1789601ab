#!/usr/bin/env bash
# Every GPU figure the open issues ask for, in one call of about nine minutes on a lent GPU (which
# installs nothing): each script's report goes to $OUT/<name>.out and its log to $OUT/<name>.log, in
# order of priority, each under its own time limit so that one slow piece cannot starve the rest.
#
#   OUT=/tmp/gpu bash bench/gpu_session.sh          # on the GPU machine, from the repository root
#   TINY=1 OUT=/tmp/gpu bash bench/gpu_session.sh   # a quick pass on a CPU, to check the script itself
#
# - accelerator: ceilings, prefill MFU (pure-JAX blocks against cuDNN), decode of a chunk and of a step
#   against the HBM roofline with dense and ragged (Pallas Triton) decode attention (issue 12);
# - serve: continuous batching against static batches, 7B shape in bf16, 64 rows, with decode's share
#   of the read roofline under load (issue 13; 8 of the 32 layers, to keep compiling short);
# - train: internlm2-1_8b-shaped step, bf16 compute, f32 master weights, two remat policies (issue 14);
# - long: a 200K-token prompt of the 1M-context shape on this one device (issue 12).
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
if [ -n "${TINY:-}" ]; then
  ACC=(--tiny --layers 2 --prompts 512 --impls blockwise --batch 1 --new 80); SERVE=(--hidden 128 --layers 2 --requests 8 --max-batch 4 --max-prompt 64 --max-output 32)
  TRAIN=(--preset internlm2-1_8b --layers 1 --batch 1 --seq 64 --steps 2 --remat none); LONG=(--tiny --layers 2 --prompts --impls --batch --long 4096)
else
  ACC=(--layers 32 --prompts 8192 32768 --impls blockwise cudnn --batch 1 32 --weights packed --new 128)
  SERVE=(--preset internlm2_5-7b --layers 8 --dtype bfloat16 --max-batch 64)
  TRAIN=(--preset internlm2-1_8b --batch 8 --seq 4096 --steps 5 --remat dots_no_batch,full)
  LONG=(--layers 32 --prompts --impls --batch --long 200000)
fi
run() {  # name, seconds, script and arguments
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" python "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  echo "$name: exit $? after $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
run accelerator 200 bench/accelerator.py "${ACC[@]}" --decode-attention dense ragged
run serve 130 bench/serve.py --engine --repeats 2 "${SERVE[@]}"
run train 110 bench/train.py "${TRAIN[@]}"
run long 150 bench/accelerator.py "${LONG[@]}"
