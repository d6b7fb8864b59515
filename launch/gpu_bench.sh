#!/usr/bin/env bash
# The whole GPU measurement in one call (docs/performance.md § GPU), sized to
# finish in about 7 minutes on one H200:
#   1. versions and the device;
#   2. the order-3 step alone: XLA's predicted peak per device, the peak the
#      allocator measured, and the peak predicted for $TARGET from abstract
#      shapes (the AOT path of `bench --suite compile --target`);
#   3. the step at orders 0-5 (ratios to order 0 beside the paper's Table 5),
#      MFU, and the order-3 step with cuDNN attention and with the
#      latency-hiding scheduler as A/Bs in the same rounds;
#   4. the rank losses alone at one device's shape (bench.losses);
#   5. with $TARGET, the order-3 step's predicted time for this many GPUs of
#      that kind at $ROWS rows (bench --suite predict) beside the time step 3
#      measured: their ratio is the efficiency to put in bench/predict.py.
# Every suite's numbers are written to $OUT as soon as they are measured.
#
#   OUT=results launch/gpu_bench.sh                 # on the GPU machine
#   DEVICE=cpu ROWS=4 ORDERS=0,3 SUITES=step AB=attention=xla LOSS_SIZES=8x64 TARGET= \
#     MODEL=students=none OUT=/tmp/b launch/gpu_bench.sh   # the same path on a CPU (a test)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the directory for the results}
DEVICE=${DEVICE:-gpu}          # the shape: gpu = the paper's per device
ROWS=${ROWS:-512}              # rows per device
TARGET=${TARGET-h200}          # the AOT prediction's target ("" = none)
ROUNDS=${ROUNDS:-2}
REPEATS=${REPEATS:-3}
SUITES=${SUITES:-step,mfu}     # the timed suites of step 3
ORDERS=${ORDERS:-0,1,2,3,4,5}
AB=${AB:-attention=cudnn xla_gpu_enable_latency_hiding_scheduler=true}   # A/Bs of order 3
LOSS_SIZES=${LOSS_SIZES:-512x4096}   # the losses' ROWSxM, timed and their memory checked
MODEL=${MODEL:-}               # config.model overrides for steps 2-3, e.g. remat=dots
PYTHON=${PYTHON:-python3}
# A compilation cache shared by the calls below: the step suite reads the
# order-3 step the memory suite compiled (compile seconds are not timed).
# JAX's own $JAX_COMPILATION_CACHE_DIR when set (the tests' shared cache),
# else a fresh one.
if [ -n "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  CACHE=$JAX_COMPILATION_CACHE_DIR
else
  CACHE=$(mktemp -d)
  trap 'rm -rf "$CACHE"' EXIT
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

"$PYTHON" - <<'PY' | tee "$OUT/versions.txt"
import importlib.metadata as md, platform
import jax
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
  try:
    print(f"{name} {md.version(name)}")
  except md.PackageNotFoundError:
    print(f"{name} not installed")
print(f"python {platform.python_version()}; backend {jax.default_backend()}; "
      f"{jax.device_count()} x {jax.devices()[0].device_kind}")
PY
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv | tee -a "$OUT/versions.txt" || true

"$PYTHON" -m dinorank_jax.bench --suite memory --device "$DEVICE" --rows "$ROWS" \
  ${TARGET:+--target "$TARGET"} ${MODEL:+--model "$MODEL"} --compilation_cache "$CACHE" \
  --json "$OUT/memory.json" 2>&1 \
  | tee "$OUT/memory.log"

"$PYTHON" -m dinorank_jax.bench --suite "$SUITES" --device "$DEVICE" --rows "$ROWS" \
  --orders "$ORDERS" --rounds "$ROUNDS" --repeats "$REPEATS" ${MODEL:+--model "$MODEL"} \
  --compilation_cache "$CACHE" \
  $(for v in $AB; do echo --ab "$v"; done) --json "$OUT/gpu.json" 2>&1 | tee "$OUT/step.log"

"$PYTHON" -m dinorank_jax.bench.losses --sizes "$LOSS_SIZES" --memory_size "$LOSS_SIZES" \
  --repeats 3 --json "$OUT/losses.json" 2>&1 | tee "$OUT/losses.log"

if [ -n "$TARGET" ]; then
  GPUS=$("$PYTHON" -c "import jax; print(jax.device_count())")
  "$PYTHON" -m dinorank_jax.bench --suite predict --target "$TARGET" --device "$DEVICE" \
    --gpus "$GPUS" --rows "$ROWS" --orders 3 ${MODEL:+--model "$MODEL"} \
    --json "$OUT/predict.json" 2>&1 | tee "$OUT/predict.log"
  "$PYTHON" - "$OUT" <<'PY' | tee "$OUT/predicted_vs_measured.txt"
import json, sys
out = sys.argv[1]
predicted, = json.load(open(f"{out}/predict.json"))["predict"]
measured = next(r for r in json.load(open(f"{out}/gpu.json"))["step"] if r["model"] == "order 3")
ratio = predicted["bound_s"] / (measured["ms"] / 1000)
print(f"order 3, {predicted['gpus']} x {predicted['target']}, {predicted['rows_per_gpu']} rows: "
      f"predicted {1000 * predicted['step_s']:.1f} ms (bound {1000 * predicted['bound_s']:.1f} ms "
      f"/ efficiency {predicted['efficiency']}), measured {measured['ms']:.1f} ms; "
      f"measured efficiency {ratio:.3f}")
PY
fi
