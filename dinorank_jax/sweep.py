"""Trains one config at several rank orders and reports them side by side.

    python -m dinorank_jax.sweep --config configs/demo.py --orders 0,1,2,3 --workdir runs/sweep
    python -m dinorank_jax.sweep --config configs/r3.py:/data/cc3m --config.epochs=32 \
        --orders 0,1,2,3,4,5 --suite imagenet,imagenet_r,coco --data_dir /data \
        --workdir /ckpt/sweep

For each order R of `--orders`, in turn: trains the config with
`model.rank_order = R` in `WORKDIR/r<R>` (the `dinorank_jax.main` run
directory: checkpoints, metrics.jsonl), exports it to `WORKDIR/exports/r<R>`
and evaluates the export on `--suite` (default: the config's `eval.suites`,
else `synthetic`) into `WORKDIR/reports/r<R>`, with the training's cost
(median step time, compiled peak memory, rank-head parameters) beside its
numbers. Then `WORKDIR/report` merges every order evaluated so far
(`evaluate --compare`): the paper's Table 5 layout with its published rows,
and `order_sweep.png`, accuracy and step time against the order.

Resumable: an order whose report holds its last step is neither trained
nor evaluated again; one that stopped part-way (Ctrl-C, SIGTERM, a crash)
resumes from its checkpoint. A sweep split over separate jobs (one order
each, the same WORKDIR) is merged by any of them, and again by this command
once all are done, which then trains nothing.

Multi-host: every process runs this command and each order trains on all
of them, one after another; exporting and evaluating is left to a
one-process run of the same command afterwards (one host's devices), which
finds every order trained. launch/sweep.sbatch runs both.
"""

import json
import os
import statistics
import sys

from absl import app, flags, logging
import jax

from dinorank_jax import (checkpoint, compilation, config_checks, errors, export, main as main_lib,
                          metric_writer, train)
from dinorank_jax import workdir as workdir_lib
from dinorank_jax.data import records
from dinorank_jax.evaluate import __main__ as evaluate_cli, report, suites
from dinorank_jax.models import summary

_ORDERS = flags.DEFINE_list("orders", "0,1,2,3", "rank orders to train, comma-separated")
_SUITE = flags.DEFINE_string("suite", None, "evaluation suites (python -m dinorank_jax.evaluate's "
                             "names; default: the config's eval.suites, else synthetic)")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "where the suites' datasets are looked for "
                                "(default: the config's eval.data_dir)")
DEVICES = "sweep_devices.json"      # in an order's run directory: what trained it
COMMAND = main_lib.Command(
    "python -m dinorank_jax.sweep --config configs/demo.py --orders 0,1,2,3 --workdir DIR "
    "[--suite S] [--data_dir D] [--config.FIELD=VALUE ...]", __doc__.split("\n")[0],
    (*main_lib.MAIN.flags[:5], _ORDERS, _SUITE, _DATA_DIR))


def order_config(base, order: int):
  """A copy of the config `base` at rank order `order`, every other field as given."""
  copy = base.copy_and_resolve_references()
  copy.model.rank_order = order
  return copy


def paths(workdir: str, order: int) -> dict[str, str]:
  """Where order `order` of the sweep in `workdir` trains, exports and reports."""
  return {"run": os.path.join(workdir, f"r{order}"),
          "export": os.path.join(workdir, "exports", f"r{order}"),
          "report": os.path.join(workdir, "reports", f"r{order}")}


def _reported_step(report_dir: str) -> int | None:
  """The training step the order's report evaluated (None: not reported)."""
  try:
    with open(os.path.join(report_dir, report.RESULTS)) as f:
      (model,) = json.load(f)["models"].values()
  except (OSError, ValueError):
    return None
  return model.get("model", {}).get("source", {}).get("step")


def record_devices(run: str) -> None:
  """Writes the devices that trained `run` (`DEVICES`), for the one-process
  run that reports it later: its own are not necessarily those."""
  records.write_json(os.path.join(run, DEVICES), {
      "devices": jax.device_count(), "processes": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind})


def training_cost(run: str, config, steps: int) -> dict:
  """What training the order in `run` cost: the median logged step time,
  the compiled step's peak memory per device, the rank heads' parameters
  (which exports leave out: inference does not rank) and the devices that
  trained it (empty when the sweep did not train it)."""
  try:
    with open(os.path.join(run, DEVICES)) as f:
      devices = json.load(f)
  except FileNotFoundError:
    devices = {}
  rows = metric_writer.read(run)
  seconds = [r["step_seconds"] for r in rows if "step_seconds" in r]
  peaks = [r["compile/peak_bytes"] for r in rows if "compile/peak_bytes" in r]
  model = train.build_model(config, records.read_metadata(config.data.path))
  params = summary.abstract_params(model, config.data.image_size)
  heads = {k: v for k, v in params.items() if k.endswith("rank_head")}
  return {"steps": steps, "step_seconds": statistics.median(seconds) if seconds else None,
          "peak_bytes": peaks[-1] if peaks else None, "rank_head_params": summary.count(heads),
          "batch_size": config.batch_size, **devices}


def total_steps(config) -> int:
  """The steps a run of `config` trains (its records must be there)."""
  return train.epoch_steps(config, records.read_metadata(config.data.path)) * config.epochs


def evaluate_order(config, where: dict, names: list[str], data_dir: str) -> None:
  """A one-process run's part of a trained order: the export, then its
  evaluation and its training's cost as the order's report."""
  export.export(where["run"], where["export"], overwrite=True)
  results = evaluate_cli.evaluate_models(
      [where["export"]], names, data_dir, batch_size=config.eval_batch_size,
      probe_limit=suites.PROBE_LIMIT, log=lambda line: logging.info("%s", line))
  (model,) = results["models"].values()
  statuses = [r["status"] for r in model["suites"].values()]
  if "ok" not in statuses:      # before the other orders train: the data is elsewhere
    raise errors.UserError(
        f"order {config.model.rank_order} was trained but nothing was evaluated: every suite was "
        f"skipped ({statuses[0]}); run again with the right --data_dir or --suite (the trained "
        "orders are kept)")
  model["training"] = training_cost(where["run"], config, total_steps(config))
  report.write(results, where["report"])


def _finished(config, run: str) -> bool:
  """Whether the run in `run` has its last step saved. A run with a
  checkpoint whose stored config changes the model or the data is refused
  (`workdir.config_changes`), as resuming it would be."""
  steps = checkpoint.saved_steps(run)
  if not steps:
    return False
  stored = workdir_lib.stored_config(run)
  if stored is not None:
    workdir_lib.config_changes(stored, json.loads(config.to_json_best_effort()))
  return steps[-1] >= total_steps(config)


def evaluates_here() -> bool:
  """Whether this run exports and evaluates: only a one-process run does (on
  several, process 0 alone would hold the others' collectives waiting)."""
  return jax.process_count() == 1


def sweep(config, workdir: str, orders: list[int], names: list[str], data_dir: str) -> str | None:
  """Trains each order not trained yet; on one process, exports and
  evaluates each order not reported yet. Returns the directory of the merged
  report of every order reported so far (None when training stopped early,
  on SIGTERM: run again to resume)."""
  lead = jax.process_index() == 0
  for order in orders:
    config_r, where = order_config(config, order), paths(workdir, order)
    if not _finished(config_r, where["run"]):
      logging.info("order %d: training in %s", order, where["run"])
      train.train_and_evaluate(config_r, where["run"])
      if not _finished(config_r, where["run"]):
        logging.warning("order %d stopped before its last step: run the same command to resume",
                        order)
        return None
      if lead:
        record_devices(where["run"])
    last = checkpoint.saved_steps(where["run"])[-1]
    if _reported_step(where["report"]) == last:
      logging.info("order %d: step %d evaluated in %s", order, last, where["report"])
    elif evaluates_here():
      evaluate_order(config_r, where, names, data_dir)
    else:
      logging.info("order %d: trained; a one-process run of this command exports and evaluates "
                   "it (launch/sweep.sbatch)", order)
  done = [paths(workdir, o)["report"] for o in sorted(_orders_reported(workdir))]
  merged = os.path.join(workdir, "report")
  if lead and done:
    report.write(report.merge(done), merged)
  return merged if done else None


def _orders_reported(workdir: str) -> list[int]:
  """Every order of the sweep in `workdir` with a report, this run's or another job's."""
  reports = os.path.join(workdir, "reports")
  found = os.listdir(reports) if os.path.isdir(reports) else []
  return [int(d[1:]) for d in found if d[:1] == "r" and d[1:].isdigit()
          and _reported_step(os.path.join(reports, d)) is not None]


def _orders(values: list[str]) -> list[int]:
  try:
    orders = [int(v) for v in values]
  except ValueError:
    raise errors.UserError(f"--orders {','.join(values)}: give rank orders as integers, "
                           "e.g. --orders 0,1,2,3") from None
  if not orders or len(set(orders)) != len(orders):
    raise errors.UserError(f"--orders {','.join(values)}: give each rank order once")
  return orders


@errors.guard
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(main_lib.quiet_orbax)
  main_lib.initialize_distributed()
  config, workdir = (flag.value for flag in main_lib.MAIN.flags[:2])   # --config, --workdir
  if not workdir:
    raise errors.UserError("--workdir is required: the sweep's directory, a new one or one to "
                           "resume")
  errors.check_output_directory(workdir, "--workdir")
  orders = _orders(_ORDERS.value)
  try:
    names = suites.expand((_SUITE.value or config.eval.suites or "synthetic").split(","))
  except ValueError as e:
    raise errors.UserError(f"--suite: {e}") from None
  data_dir = _DATA_DIR.value or config.eval.data_dir
  for order in orders:     # every order's config is checked before the first trains
    config_checks.validate(order_config(config, order))
  compilation.use_cache(config.compilation_cache)
  merged = sweep(config, workdir, orders, names, data_dir)
  if merged and jax.process_index() == 0:
    with open(os.path.join(merged, "report.md")) as f:
      print(f.read())
    print(f"wrote {merged}/report.md", file=sys.stderr)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: main_lib.parse_flags(argv, COMMAND))
