#!/usr/bin/env bash
# N processes on this machine, D virtual CPU devices each, joined by
# jax.distributed over localhost with gloo collectives: the multi-host code
# paths without a cluster (tests/test_train.py runs 2 × 4 against 1 × 8).
# For trying those paths, not for training: the tiny test config's step on
# 2 × 4 devices takes 1-2 s on 2 cores (docs/training.md § Multi-host).
#
#   launch/multiprocess_cpu.sh N D [dinorank_jax.main flags]
#   launch/multiprocess_cpu.sh 2 4 --config configs/demo.py --workdir runs/demo-2x4
#
# Knobs (environment):
#   PYTHON   interpreter with dinorank_jax installed (default: python)
#   MODULE   the command each process runs (default: dinorank_jax.main;
#            dinorank_jax.sweep takes the same flags and more)
#   PORT     coordinator port on localhost (default: a random free-looking one)
#   XLA_FLAGS  kept, with the device count set after it (the last count wins)
# If one process fails, the others are stopped and its exit status returned.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [flags]" >&2
  exit 2
fi
n=$1 devices=$2
shift 2
port=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    "${PYTHON:-python}" -m "${MODULE:-dinorank_jax.main}" --coordinator_address="localhost:$port" \
    --num_processes="$n" --process_id="$i" "$@" &
  pids+=($!)
done
for ((i = 0; i < n; i++)); do
  status=0
  wait -n || status=$?
  if ((status != 0)); then
    kill "${pids[@]}" 2>/dev/null || true
    exit "$status"
  fi
done
