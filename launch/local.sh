#!/usr/bin/env bash
# Trains on this host: every local GPU (or the CPU when JAX sees none).
#
#   launch/local.sh CONFIG WORKDIR [more dinorank_jax.main flags]
#   launch/local.sh configs/r3.py:/data/cc3m runs/r3 --config.data.eval_path=/data/cc3m-val
#
# Knobs (environment):
#   PYTHON                         interpreter with dinorank_jax installed (default: python)
#   CUDA_VISIBLE_DEVICES           which GPUs to use
#   XLA_PYTHON_CLIENT_MEM_FRACTION share of GPU memory JAX preallocates (JAX's default: 0.75)
# Rerunning with the same WORKDIR resumes from its latest checkpoint.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [flags]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
exec "${PYTHON:-python}" -m dinorank_jax.main --config "$config" --workdir "$workdir" "$@"
