"""Trains DinoRankCLIP.

    python -m dinorank_jax.main --config configs/r3.py:/data/cc3m --workdir runs/r3
    python -m dinorank_jax.main --config configs/demo.py --workdir runs/demo

Multi-host: `jax.distributed.initialize()` runs when SLURM launched the job
(detected from its environment) or when `--coordinator_address` is given
with `--num_processes` and `--process_id`; every process runs this same
command. On CPU the collectives go through gloo.
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from dinorank_jax import compilation, train
from dinorank_jax.data import records

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, config")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs off SLURM")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --coordinator_address")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --coordinator_address")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Joins the other processes of the job, if there are any."""
  if _COORDINATOR.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()      # coordinator, count and id from SLURM's environment


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
  """Orbax logs every save at INFO; keep its warnings only."""
  return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_orbax)
  initialize_distributed()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  config = _CONFIG.value
  compilation.use_cache(config.compilation_cache)
  try:
    metrics = train.train_and_evaluate(config, _WORKDIR.value)
  except (train.ConfigError, train.NonFiniteLoss) as e:
    sys.exit(f"error: {e}")
  if metrics and jax.process_index() == 0:
    tasks = records.read_metadata(config.data.eval_path).get("zero_shot_tasks") or {}
    train.print_table(metrics, tasks)


if __name__ == "__main__":
  app.run(main)
