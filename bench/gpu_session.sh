#!/usr/bin/env bash
# Every GPU figure the open issues ask for, on a lent GPU whose image installs nothing (no pydantic, no
# torch needed on these paths). Run it through the device tool from the repository root, leaving its
# $OUT alone (only what is written under the tool's $OUT comes back):
#
#   bash bench/gpu_session.sh                       # accelerator, serve, train: about 7.5 minutes
#   PIECES=long bash bench/gpu_session.sh           # the 200K-token prompt, in a call of its own
#   TINY=1 OUT=/tmp/gpu bash bench/gpu_session.sh   # a quick pass on a CPU, to check the script itself
#
# Each piece writes $OUT/<name>.txt (its stdout and stderr, unbuffered, so a piece stopped by its time
# limit keeps what it printed); the tables are printed again at the end for the tool's output tail.
# - accelerator: ceilings, prefill MFU (cuDNN, the kernel "auto" picks in bf16) at 8K and 32K, decode
#   chunks at batch 1 and 32 with dense and ragged (Pallas Triton) attention against the HBM roofline
#   (issue 12); each decode row is caught on its own, so one failure does not cost the others;
# - serve: continuous batching against static batches, 7B shape in bf16, 64 rows, 8 of 32 layers (issue 13);
# - train: internlm2-1_8b-shaped step, bf16 compute, f32 master weights, remat full then dots_no_batch
#   (issue 14);
# - long: a 200K-token prompt of the 7B-1M shape on this one device, prefilled in 16K chunks (issue 12).
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the library from this checkout (nothing is installed)
export PYTHONUNBUFFERED=1
export XLA_CLIENT_MEM_FRACTION=${XLA_CLIENT_MEM_FRACTION:-.95}  # JAX takes 75% of the GPU by default
PY=${PYTHON:-python3}
PIECES=${PIECES:-accelerator serve train}
if [ -n "${TINY:-}" ]; then
  ACC=(--tiny --layers 2 --prompts 512 --impls blockwise --batch 1 --new 80)
  SERVE=(--hidden 128 --layers 2 --requests 8 --max-batch 4 --max-prompt 64 --max-output 32)
  TRAIN=(--preset internlm2-1_8b --layers 1 --batch 1 --seq 64 --steps 2 --remat none)
  LONG=(--tiny --layers 2 --prompts --impls --batch --long 4096)
else
  ACC=(--layers 32 --prompts 8192 32768 --impls cudnn --batch 1 32 --weights sliced --new 128 --no-step)
  SERVE=(--preset internlm2_5-7b --layers 8 --dtype bfloat16 --max-batch 64)
  TRAIN=(--preset internlm2-1_8b --batch 4 --seq 4096 --steps 5 --remat full,dots_no_batch)
  LONG=(--layers 1 --prompts --impls --batch --long 200000 --long-prompt-chunk 16384)
fi
run() {  # name, seconds, script and arguments
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$PY" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
for piece in $PIECES; do
  case $piece in
    accelerator) run accelerator 220 bench/accelerator.py "${ACC[@]}" --decode-attention dense ragged ;;
    serve) run serve 120 bench/serve.py --engine --repeats 2 "${SERVE[@]}" ;;
    train) run train 110 bench/train.py "${TRAIN[@]}" ;;
    long) run long 420 bench/accelerator.py "${LONG[@]}" ;;
    *) echo "unknown piece $piece" ;;
  esac
done
for f in "$OUT"/*.txt; do  # again for the tool's output tail, without the libraries' start-up noise
  echo "== $(basename "$f")"
  grep -v -E 'E0000|W0000|WARNING|InitGoogle|Source Location|libtpu|^=== |^ *$' "$f" | cut -c1-400 | tail -n 40
done
