"""Trains DinoRankCLIP.

    python -m dinorank_jax.main --config configs/r3.py:/data/cc3m --workdir runs/r3
    python -m dinorank_jax.main --config configs/demo.py --workdir runs/demo

`--help` lists the flags and every config field with its value (those of
`--config` when given, else of the paper's recipe); `--print_config` prints
the resolved config, overrides applied, and exits.

Multi-host: `jax.distributed.initialize()` runs when SLURM launched the job
(detected from its environment) or when `--coordinator_address` is given
with `--num_processes` and `--process_id`; every process runs this same
command. On CPU the collectives go through gloo.
"""

import collections
import difflib
import importlib.util
import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from dinorank_jax import compilation, config as config_lib, errors, train
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
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False,
                                   "print the resolved config (overrides applied) and exit")
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")
# What `--help` and the flag errors of a command built on these flags say:
# its usage line, one-line summary and the flags it reads.
Command = collections.namedtuple("Command", "usage summary flags")
MAIN = Command("python -m dinorank_jax.main --config configs/r3.py[:DATA] --workdir DIR "
               "[--config.FIELD=VALUE ...]", __doc__.split("\n")[0],
               (_CONFIG, _WORKDIR, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _ALLOW_CHANGE,
                _PRINT_CONFIG))


def load_config_file(spec: str):
  """The config a `--config` value names (`path[:argument]`), loaded as
  ml_collections loads it: the file's `get_config(argument)`."""
  path, _, argument = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_dinorank_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def _fields(config, prefix: str = "") -> dict:
  """Every leaf of `config` as `{"a.b.c": value}`."""
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(_fields(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def suggest(field: str, config) -> str | None:
  """The config field a mistyped `field` (`optim.learning_rate`) most likely
  means: a close spelling, or a field named by the mistake's initials
  (`lr`), preferring the same section."""
  fields = list(_fields(config))
  section, _, name = field.rpartition(".")
  initials = "".join(w[0] for w in name.split("_") if w)

  def score(candidate: str) -> float:
    c_section, _, c_name = candidate.rpartition(".")
    close = 1.0 if c_name == initials and len(initials) > 1 else difflib.SequenceMatcher(
        None, name, c_name).ratio()
    return close + (0.25 if c_section == section else 0.0)

  best = max(fields, key=score, default=None)
  return best if best is not None and score(best) >= 0.75 else None


def _help(argv: list[str], command: Command) -> str:
  """`--help`: usage, the flags, and every config field with its value."""
  spec = _config_spec(argv)
  config = load_config_file(spec) if spec else config_lib.paper()
  lines = [f"usage: {command.usage}", "", command.summary, "", "flags:"]
  for flag in command.flags:
    default = "" if flag.default in (None, False) else f" (default {flag.default})"
    lines.append(f"  --{flag.name}: {flags.FLAGS[flag.name].help}{default}")
  lines += ["", f"config fields ({spec or 'the paper recipe, configs/r3.py'}), each settable "
            "as --config.FIELD=VALUE; configs/README.md explains them:"]
  lines += [f"  {k} = {v!r}" for k, v in _fields(config).items()]
  return "\n".join(lines)


def _flag_error(error: Exception, argv: list[str], command: Command) -> str:
  """One line for a command line that does not parse: a bad value names the
  flag, the value and the type expected; an unknown flag or config field
  gets the closest real one."""
  message = " ".join(str(error).replace("\\n", " ").replace("\\", "").split()).strip("'\"")
  bad_value = re.match(r"flag --([\w.]+)=(.*?): ", message)
  if isinstance(error, flags.IllegalFlagValueError) and bad_value:
    name, value = bad_value.groups()
    return f"bad value {value!r} for --{name}: expected {_expected(name, argv)}"
  if isinstance(error, flags.UnrecognizedFlagError):
    return _unknown_flag(error.flagname, argv, command)
  if isinstance(error, (KeyError, AttributeError)):   # a field missing inside a section
    missing = re.match(r"(\w+)", message).group(1)
    field = next((a.removeprefix("--config.").split("=")[0] for a in argv
                  if a.startswith("--config.") and missing in a.split("=")[0].split(".")),
                 missing)
    return _unknown_field(field, argv)
  return message


def _expected(name: str, argv: list[str]) -> str:
  """What flag `name` (`config.optim.lr`, `num_processes`) takes, in words."""
  if not name.startswith("config."):
    return {"int": "an integer", "bool": "true or false"}.get(
        flags.FLAGS[name].flag_type(), flags.FLAGS[name].flag_type())
  field = name.removeprefix("config.")
  value = _fields(load_config_file(_config_spec(argv))).get(field)
  kind = {bool: "true or false", int: "an integer", float: "a number",
          str: "a string"}.get(type(value))
  if kind is None:
    return f"one of its fields, set as --{name}.FIELD=VALUE"
  return f"{kind} (the config has {value!r})"


def _closest_field(field: str, argv: list[str]) -> str | None:
  try:
    return suggest(field, load_config_file(_config_spec(argv)))
  except Exception:  # the config file itself is reported by parse_flags
    return None


def _unknown_field(field: str, argv: list[str]) -> str:
  closest = _closest_field(field, argv)
  hint = f"did you mean --config.{closest}?" if closest else "see configs/README.md"
  return (f"unknown config field --config.{field}: {hint} "
          "(python -m dinorank_jax.main --help lists the fields)")


def _unknown_flag(name: str, argv: list[str], command: Command) -> str:
  """`--workdr` → `--workdir`; `--confg.epochs` → `--config.epochs`."""
  if "." in name:
    closest = _closest_field(name.partition(".")[2], argv)
    hint = (f"did you mean --config.{closest}?" if closest
            else "config fields are set as --config.FIELD=VALUE")
  else:
    closest = difflib.get_close_matches(name, [f.name for f in command.flags], n=1)
    hint = f"did you mean --{closest[0]}?" if closest else "see --help"
  return f"unknown flag --{name}: {hint}"


def _config_spec(argv: list[str]) -> str | None:
  """The `--config` value, `path[:argument]`, or None."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_path(argv: list[str]) -> str:
  spec = _config_spec(argv)
  return "(--config)" if spec is None else spec.split(":")[0]


def parse_flags(argv: list[str], command: Command = MAIN) -> list[str]:
  """absl's parsing, with every command-line mistake as one line; `--help`
  prints `_help` and exits 0. A flag that is not among `command.flags` is
  refused, as unknown."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    try:
      print(_help(argv, command))
    except Exception as e:  # a config file that does not load
      sys.exit(f"error: cannot load the config file {_config_path(argv)}: {e}")
    sys.exit(0)
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
    sys.exit(f"error: {_flag_error(e, argv, command)}")
  own = {flag.name for flag in command.flags}
  for flag in MAIN.flags:          # main's flags that another command does not read
    if flag.present and flag.name not in own:
      sys.exit(f"error: {_unknown_flag(flag.name, argv, command)}")
  return rest


def initialize_distributed() -> None:
  """Joins the other processes of the job, if there are any."""
  if _COORDINATOR.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()      # coordinator, count and id from SLURM's environment


def quiet_orbax(record: std_logging.LogRecord) -> bool:
  """Orbax logs every save at INFO; keep its warnings only."""
  return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


@errors.guard
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(quiet_orbax)
  initialize_distributed()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  config = _CONFIG.value
  if _PRINT_CONFIG.value:
    print(config)
    return
  if not _WORKDIR.value:
    raise errors.UserError("--workdir is required: the run's directory (checkpoints, metrics, "
                           "config), a new one or one to resume")
  errors.check_output_directory(_WORKDIR.value, "--workdir")
  compilation.use_cache(config.compilation_cache)
  metrics = train.train_and_evaluate(config, _WORKDIR.value,
                                     allow_config_change=_ALLOW_CHANGE.value)
  if metrics and jax.process_index() == 0:
    tasks = records.read_metadata(config.data.eval_path).get("zero_shot_tasks") or {}
    train.print_table(metrics, tasks)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
