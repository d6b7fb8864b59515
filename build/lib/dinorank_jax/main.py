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
import re
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from dinorank_jax import compilation, errors, train
from dinorank_jax.data import records

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, config")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs off SLURM")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --coordinator_address")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --coordinator_address")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "resume even though the config changes the model or the "
    "data order (docs/reliability.md)")
flags.mark_flags_as_required(["config", "workdir"])


def _flag_error(error: Exception, argv: list[str]) -> str:
  """One line for a command line that does not parse (unknown config field,
  missing config file, bad value)."""
  message = " ".join(str(error).replace("\\n", " ").replace("\\", "").split()).lstrip("'\"")
  unknown = re.match(r"'?(\w+)'?\s+Did you mean \"(\w+)\"", message)
  if unknown:
    field, closest = unknown.groups()
    flag = next((a.split("=")[0] for a in argv if re.search(rf"\.{field}(=|$)", a)), field)
    return f"unknown config field {flag}: did you mean {flag.rsplit('.', 1)[0]}.{closest}?"
  if isinstance(error, (KeyError, AttributeError)):
    return f"unknown config field {message} (see configs/README.md for the fields)"
  return message


def _config_path(argv: list[str]) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":")[0]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return "(--config)"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with every command-line mistake as one line."""
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.keys()   # a config file that failed to load raises on any attribute
  except Exception as e:   # absl, ml_collections and the config file raise many types
    cause = e.__cause__ or e
    if "config file" in str(e) or isinstance(cause, SyntaxError):
      path = _config_path(argv)
      why = ("no such file" if "No such file" in str(e)
             else " ".join(str(cause).split())[:200])
      sys.exit(f"error: cannot load the config file {path}: {why} (the configs are in configs/)")
    sys.exit(f"error: {_flag_error(e, argv)}")
  return rest


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


@errors.guard
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_orbax)
  initialize_distributed()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  config = _CONFIG.value
  compilation.use_cache(config.compilation_cache)
  metrics = train.train_and_evaluate(config, _WORKDIR.value,
                                     allow_config_change=_ALLOW_CHANGE.value)
  if metrics and jax.process_index() == 0:
    tasks = records.read_metadata(config.data.eval_path).get("zero_shot_tasks") or {}
    train.print_table(metrics, tasks)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
