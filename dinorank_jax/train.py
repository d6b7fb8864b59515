"""The training loop: `train_and_evaluate(config, workdir)`.

One loop for one CPU, one GPU, a node or several hosts: the batch is sharded
over every device of every process (`parallel`), each process reads its rows
of every global batch (`data.pipeline`), and the step is the jitted,
state-donating train step of `step.build`. The run resumes from the latest
complete checkpoint in `workdir` (state and data iterator, so the batches
continue exactly), saves every `config.checkpoint.every` steps, at the end,
and when SIGTERM (preemption) or Ctrl-C (SIGINT) arrives: at the end of the
step under way, then it exits (after Ctrl-C with `errors.Interrupted`,
which names the saved step; a second Ctrl-C exits at once). Evaluation runs on
every process. A non-finite loss stops the run naming the step, the
offending terms and the last good checkpoint (`config.on_nonfinite="stop"`)
or skips that update (`"skip"`, inside the step).

The workdir holds `config.json` (the resolved config the checkpoints
follow), `starts/` (each start's config copy), `lock.json` while a run holds
it (`workdir.lock`), `metrics.jsonl`, `tensorboard/` and `checkpoints/`.
Every field, and every shape the model and step assume (patches, the batch
over the devices, the rank lists), is validated (`config_checks`) before the
data is prepared or anything is built or compiled.
"""

import functools
import json
import logging
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from dinorank_jax import (compilation, config_checks, errors, evaluate, export, optim, parallel,
                          warm_start)
from dinorank_jax import workdir as workdir_lib
from dinorank_jax.checkpoint import Best, Checkpointer
from dinorank_jax.data import records
from dinorank_jax.data.pipeline import make_dataset
from dinorank_jax.data.prepare import prepare
from dinorank_jax.errors import UserError
from dinorank_jax.evaluate import clip_benchmark, suites
from dinorank_jax.evaluate.metrics import InvalidEmbeddings
from dinorank_jax.losses.distill import PROJECTED
from dinorank_jax.metric_writer import MetricWriter
from dinorank_jax.models import DinoRankCLIP, from_config, summary
from dinorank_jax.models.layers import REMAT_POLICIES
from dinorank_jax.step import Objective, build

class NonFiniteLoss(UserError, RuntimeError):
  """The loss stopped being finite; the message names the step and terms."""


class StepDoesNotFit(UserError, MemoryError):
  """The compiled train step needs more memory per device than there is;
  the message names settings that fit."""


def memory_limit(config) -> int | None:
  """Bytes the train step may use per device: `config.device_memory_gib`
  when set, else what JAX's allocator holds on this process's first device
  (None where the backend does not say, as on the CPU)."""
  if config.device_memory_gib:
    return int(config.device_memory_gib * 2 ** 30)
  return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")


def _gib(n: int) -> str:
  return f"{n / 2 ** 30:.1f} GiB"


def check_fits(report: dict, limit: int | None, config, *, devices: int,
               device_kind: str, remat_peaks=()) -> None:
  """Raises `StepDoesNotFit` when the compiled step's peak per device
  (`compilation.compile_ahead`'s `peak_bytes`) exceeds `limit`, naming the
  peak, the limit and what fits: the first of `remat_peaks` (`(policy,
  peak)` of coarser policies, compiled by the caller) under the limit, and
  a batch size and accumulation steps estimated from the temporaries, which
  grow with the rows of a device."""
  peak = report.get("peak_bytes")
  if limit is None or peak is None or peak <= limit:
    return
  fixes = [f"--config.model.remat={p} ({_gib(b)})" for p, b in remat_peaks if b <= limit][:1]
  fixed, temp = peak - report["temp_bytes"], report["temp_bytes"]
  if fixed < limit:
    share = (limit - fixed) / temp            # of today's temporaries that would fit
    accum = config.optim.accum_steps
    unit = devices * accum
    batch = int(config.batch_size * share) // unit * unit
    if batch:
      fixes.append(f"--config.batch_size={batch}")
    per_device = config.batch_size // devices
    steps = next((k for k in range(accum + 1, per_device + 1)
                  if per_device % k == 0 and accum / k <= share), None)
    if steps:
      fixes.append(f"--config.optim.accum_steps={steps}")
  advice = (f"it would fit with {' or '.join(fixes)} (batch size and accumulation steps "
            "estimated from the temporaries)" if fixes else
            "the parameters and optimiser state alone do not fit: shard them with "
            "--config.mesh.fsdp")
  raise StepDoesNotFit(
      f"the train step needs {_gib(peak)} per device (arguments {_gib(report['argument_bytes'])}"
      f", temporaries {_gib(temp)}), more than the {_gib(limit)} JAX may use on {device_kind}"
      f" (config.device_memory_gib or XLA_PYTHON_CLIENT_MEM_FRACTION): {advice}")


def start_summary(config, params, table: str, workdir: str, steps_per_epoch: int,
                  total_steps: int) -> str:
  """What a run is about to do, in four lines (the whole parameter table is
  in the workdir's `parameters.txt`)."""
  m = config.model
  students = {"none": "no students", "image": f"image student {m.image_student}",
              "both": f"students {m.image_student} / {m.text_student}"}[m.students]
  parts = ", ".join(f"{name} {summary.count(sub):,}" for name, sub in params.items())
  devices, processes = jax.device_count(), jax.process_count()
  return "\n".join([
      f"model: image trunk {m.image_trunk}, text trunk {m.text_trunk}, {students}, rank order "
      f"{m.rank_order}, {m.dtype}",
      f"parameters: {summary.count(params):,} ({parts}; every one in {table})",
      f"devices: {devices} on {processes} process{'es' if processes > 1 else ''}; batch "
      f"{config.batch_size} ({config.batch_size // devices} per device); {total_steps:,} steps "
      f"({config.epochs} epochs of {steps_per_epoch:,})",
      f"writing to {workdir}: checkpoints/, metrics.jsonl, tensorboard/"])


def _read_metadata(path: str) -> dict | None:
  try:
    return records.read_metadata(path) if path else None
  except FileNotFoundError:
    return None


def epoch_steps(config, meta: dict) -> int:
  """The steps of an epoch: the records trained on (`config.data.num_records`,
  else all written) over the global batch."""
  num_records = config.data.num_records or meta["counts"]["written"]
  if num_records < config.batch_size:
    raise config_checks.ConfigError(f"config.batch_size={config.batch_size} exceeds the "
                                    f"{num_records} records: lower it")
  return num_records // config.batch_size


def build_model(config, meta: dict) -> DinoRankCLIP:
  """The model of `config.model`, with the dataset's vocabulary and, for the
  projecting distillation criteria, its teacher widths."""
  teacher = meta.get("teacher") or {}
  projected = config.objective.criterion in PROJECTED and teacher
  return from_config(
      config.model, vocab_size=meta["vocab_size"], eot_id=meta["eot_id"],
      image_teacher_dims=(teacher["pca_dim"], teacher["cls_dim"]) if projected else None,
      text_teacher_dims=(teacher["text_dim"], teacher["text_dim"]) if projected else None)


def _on_stop_signal(flag: dict):
  """Sets `flag["stop"]` (and which signal) for the loop to save and exit at
  the end of the step; after Ctrl-C, a second one interrupts at once."""
  def handler(signum, frame):
    flag["stop"], flag["signal"] = True, signum
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      logging.warning("Ctrl-C: saving a checkpoint at the end of this step, then exiting "
                      "(Ctrl-C again exits at once, losing the steps since the last checkpoint)")
    else:
      logging.warning("SIGTERM: saving a checkpoint, then exiting")
  return handler


def _any_process(flag: bool) -> bool:
  """True on every process when `flag` is on any (SIGTERM may reach the
  processes a step apart; all must save the same step)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _nonfinite_error(step: int, metrics: dict, checkpointer: Checkpointer) -> NonFiniteLoss:
  terms = [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v)))]
  last = checkpointer.latest_step
  fix = "with a lower config.optim.lr, or set --config.on_nonfinite=skip"
  where = (f"resume from checkpoint {last} {fix}" if last is not None
           else f"no checkpoint was saved yet: rerun {fix}")
  return NonFiniteLoss(f"non-finite loss at step {step} (terms: {', '.join(terms)}); {where}")


def _skip_metrics(skipped: np.ndarray) -> dict[str, int]:
  """`data/skipped_<reason>` and `data/skipped_total`: records skipped so far
  in this start (`records.SKIP_REASONS`)."""
  out = {f"data/skipped_{r}": int(n) for r, n in zip(records.SKIP_REASONS, skipped)}
  return {**out, "data/skipped_total": int(skipped.sum())}


def _compile_fitting(step_for, model, state, batch, schedule, config):
  """`(compiled step, report)`, or `StepDoesNotFit` before anything runs when
  its peak exceeds `memory_limit`; the coarser remat policies are then
  compiled in turn until one fits, to name it."""
  compiled, report = compilation.compile_ahead(step_for(model), state, batch, schedule)
  logging.info("train step: %s", compilation.describe(report))
  limit = memory_limit(config)
  if limit is not None and report.get("peak_bytes", 0) > limit:
    remat_peaks, policies = [], list(REMAT_POLICIES)
    for policy in policies[policies.index(model.remat) + 1:]:
      _, other = compilation.compile_ahead(step_for(model.clone(remat=policy)), state, batch,
                                           schedule)
      remat_peaks.append((policy, other["peak_bytes"]))
      if other["peak_bytes"] <= limit:
        break
    check_fits(report, limit, config, devices=jax.device_count(),
               device_kind=jax.local_devices()[0].device_kind, remat_peaks=remat_peaks)
  return compiled, report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last evaluation's
  metrics (empty without `config.data.eval_path`).

  Holds the workdir's lock throughout. A resumed run whose config changes a
  `workdir.FIXED_ON_RESUME` field is refused unless `allow_config_change`.
  """
  config_checks.validate(config)
  lead = jax.process_index() == 0
  with workdir_lib.lock(workdir, active=lead):
    return _train(config, workdir, lead, allow_config_change)


def _train(config, workdir: str, lead: bool, allow_config_change: bool) -> dict:
  if lead:
    prepare(config)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("data prepared")
  meta = _read_metadata(config.data.path)
  config_checks.check_data(config, meta)

  mesh = parallel.make_mesh(fsdp=config.mesh.fsdp)
  steps_per_epoch = epoch_steps(config, meta)
  total_steps = steps_per_epoch * config.epochs
  best = (Best(workdir, config.eval.keep_best, config.eval.keep_best_mode)
          if config.eval.keep_best else None)
  checkpointer = Checkpointer(workdir, save_every=config.checkpoint.every,
                              max_to_keep=config.checkpoint.max_to_keep, best=best)
  config_json = config.to_json_best_effort(indent=2)
  stored = workdir_lib.stored_config(workdir)
  if stored is not None and checkpointer.latest_step is not None:
    changes = workdir_lib.config_changes(stored, json.loads(config_json),
                                         allow=allow_config_change)
    if changes:
      logging.warning("resuming %s with a changed config: %s", workdir, "; ".join(changes))
  model = build_model(config, meta)
  fresh = checkpointer.latest_step is None
  trunks = warm_start.read_trunks(config, meta) if config.init_from and fresh else None
  # Traced arguments of the step: changing them (more epochs on resume, another
  # learning rate) reuses the compiled step.
  schedule = optim.Schedule(steps_per_epoch, config.epochs, config.optim.lr,
                            config.optim.warmup_steps)
  lr = optim.learning_rate(schedule)
  optimizer = functools.partial(optim.adamw, weight_decay=config.optim.weight_decay)
  objective = Objective(**config.objective.to_dict())
  size = config.data.image_size
  step_options = dict(seed=config.seed, skip_nonfinite=config.on_nonfinite == "skip",
                      accum_steps=config.optim.accum_steps,
                      clip_grad_norm=config.optim.clip_grad_norm)
  program = build(model, optimizer, objective, mesh, size, **step_options)
  state = program.new_state()
  if lead:
    table = os.path.join(workdir, "parameters.txt")
    with open(table, "w") as f:
      f.write(summary.parameter_overview(state.params) + "\n")
    logging.info("%s", start_summary(config, state.params, table, workdir,
                                     steps_per_epoch, total_steps))
  iterator = iter(make_dataset(
      config.data.path, batch_size=config.batch_size // jax.process_count(), image_size=size,
      seed=config.seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
      num_records=config.data.num_records, threads=config.data.threads,
      worker_count=config.data.worker_count, syn_captions=objective.alip,
      max_skip_fraction=config.data.max_skip_fraction))
  restored = checkpointer.restore(program.abstract, iterator, config.batch_size)
  if restored is not None:
    state = restored
    logging.info("resumed from step %d", int(state.step))
  elif trunks is not None:
    state = state.replace(params=warm_start.replace_trunks(state.params, trunks,
                                                           program.shardings.params))
    logging.info("trunks and logit scale from %s", config.init_from)
  # The step of `model` or of the same model under another remat policy.
  step_for = lambda other: program.step if other is model else build(
      other, optimizer, objective, mesh, size, **step_options).step
  wandb = ({"project": config.log.wandb_project, "name": os.path.basename(workdir.rstrip("/")),
            "config": json.loads(config_json)} if config.log.wandb else None)
  writer = MetricWriter(workdir, active=lead, wandb=wandb)
  if lead:
    workdir_lib.record_start(workdir, config_json, int(state.step))

  eval_suites = available_suites(config)

  def run_eval(step):
    metrics = {}
    if config.data.eval_path:
      try:
        metrics = evaluate.evaluate(model, state.params, mesh, config.data.eval_path,
                                    batch_size=config.eval_batch_size, image_size=size)
      except InvalidEmbeddings as e:
        raise NonFiniteLoss(f"held-out evaluation at step {step}: {e}") from None
      writer.write(step, metrics)
    if eval_suites or best:
      # A failing suite loses no training, and the best step has its checkpoint.
      checkpointer.save(step, state, position, force=True)
      checkpointer.wait()
    if eval_suites:
      live = export.live(model, state.params, mesh, meta, size, batch_size=config.eval_batch_size)
      for name in eval_suites:
        found = run_suite(name, live, config.eval.data_dir, step)
        writer.write(step, found)
        metrics.update(found)
    if best and best.update(step, metrics, write=lead):
      logging.info("best %s so far: %.4f at step %d (export --step best)", best.metric,
                   best.value, step)
    elif best and best.metric not in metrics:
      logging.warning("config.eval.keep_best=%s is not among the evaluation's metrics at step %d "
                      "(%s): no checkpoint is kept as the best", best.metric, step,
                      ", ".join(sorted(metrics)[:8]))
    return metrics

  preempted = {"stop": False, "signal": None}
  previous = {s: signal.signal(s, _on_stop_signal(preempted))
              for s in (signal.SIGTERM, signal.SIGINT)}
  peers = parallel.watch_peers(os.path.join(workdir, "checkpoints"))
  send_buffers = parallel.widen_gloo_send_buffers()
  start = int(state.step)
  progress, stopped_at = None, None
  skipped, eval_metrics = np.zeros(len(records.SKIP_REASONS), np.int64), {}
  timer, timed_from = time.perf_counter(), start
  position = iterator.get_state()         # the data position a checkpoint records
  batch = parallel.global_batch(mesh, next(iterator)) if start < total_steps else None
  try:
    if batch is not None:
      # Compiled here, once, so that compilation never counts as a step's time.
      train_step, report = _compile_fitting(step_for, model, state, batch, schedule, config)
      parallel.wait_for_all(f"train step compiled, step {start}")
      writer.write(start, {f"compile/{k}": v for k, v in report.items()})
      timer = time.perf_counter()
    # Started after compiling, so that its rate and ETA count steps only.
    progress = tqdm(total=total_steps, initial=start, disable=not lead, unit="step",
                    dynamic_ncols=True)
    for step in range(start, total_steps):
      state, metrics = train_step(state, batch, schedule)
      position = iterator.get_state()     # before the batch of step + 1
      if step + 1 < total_steps:          # which travels while this step runs
        batch = parallel.global_batch(mesh, next(iterator))
      metrics = jax.device_get(metrics)
      skipped += np.asarray(metrics.pop("data_skipped"))
      if not metrics.pop("finite"):
        if config.on_nonfinite == "stop":
          raise _nonfinite_error(step, metrics, checkpointer)
        logging.warning("step %d: non-finite loss, update skipped", step)
      checkpointer.save(step + 1, state, position)
      if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
        seconds = (time.perf_counter() - timer) / (step + 1 - timed_from)
        timer, timed_from = time.perf_counter(), step + 1
        writer.write(step + 1, {**metrics, "lr": float(lr(step)), **_skip_metrics(skipped),
                                "step_seconds": seconds,
                                "samples_per_second": config.batch_size / seconds})
        progress.set_postfix(loss=f"{metrics['loss']:.3f}",
                             samples_s=f"{config.batch_size / seconds:.0f}")
      progress.update(1)
      if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total_steps:
        eval_metrics = run_eval(step + 1)
      if _any_process(preempted["stop"]):
        checkpointer.save(step + 1, state, position, force=True)
        stopped_at = step + 1
        break
    else:
      checkpointer.save(total_steps, state, position, force=True)
      eval_metrics = run_eval(total_steps)
  except jax.errors.JaxRuntimeError:
    if peers is not None:     # a collective with a dead peer fails at once: let the watch say so
      peers.verdict()
    raise
  finally:
    if progress is not None:
      progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    for s, handler in previous.items():
      signal.signal(s, handler)
    if send_buffers is not None:
      send_buffers.stop()
  if peers is not None:         # not after an error: the others should see this process go
    peers.finish()
  if preempted["signal"] == signal.SIGINT and stopped_at is not None:
    raise errors.Interrupted(f"saved step {stopped_at} of {total_steps} in "
                             f"{os.path.join(workdir, 'checkpoints')}; run the same command "
                             "to resume")
  return eval_metrics


def available_suites(config) -> list[str]:
  """The suites of `config.eval.suites` whose data is there. Each missing one
  is logged once, here, at start-up; process 0's findings hold for every
  process, so all run the same suites (their collectives pair up)."""
  names = config_checks.eval_suites(config)
  if not names:
    return []
  reasons = [suites.missing(name, config.eval.data_dir) for name in names]
  found = np.asarray([reason is None for reason in reasons])
  if jax.process_count() > 1:
    found = np.asarray(multihost_utils.broadcast_one_to_all(found))
  for name, reason, ok in zip(names, reasons, found):
    if not ok:
      logging.warning("config.eval.suites: %s %s", name,
                      reason or "skipped: not found on process 0")
  return [name for name, ok in zip(names, found) if ok]


def run_suite(name: str, model, data_dir: str, step: int) -> dict[str, float]:
  """Suite `name` on the live `model` (`export.live`) as `eval/<dataset>/<metric>`
  (`clip_benchmark.flat`) and `eval/<dataset>/seconds`; a suite that fails or
  finds its data gone is logged and gives nothing: training goes on."""
  start = time.perf_counter()
  try:
    result = suites.run(name, model, data_dir, batch_size=model.batch_size)
  except Exception as e:  # an evaluation must not end the run it measures
    logging.warning("evaluation suite %s failed at step %d (%s: %s); training goes on", name,
                    step, type(e).__name__, e)
    return {}
  if result["status"] != "ok":
    logging.warning("evaluation suite %s at step %d: %s", name, step, result["status"])
    return {}
  found = clip_benchmark.flat(name, result["metrics"])
  dataset = clip_benchmark.dataset_name(name)
  return {**{f"eval/{k}": v for k, v in found.items()},
          f"eval/{dataset}/seconds": time.perf_counter() - start}


def print_table(metrics: dict, tasks: dict) -> None:
  """The evaluation as a table, with the chance level of each zero-shot task
  (one over its classes) and of retrieval R@1 (one over the scenes scored)."""
  print(f"{'metric':<34}{'value':>8}{'chance':>9}")
  for name, value in sorted(metrics.items()):
    task = name.split("/", 1)[1]
    chance = (f"{1 / len(tasks[task]):.3f}" if name.startswith("zero_shot/") else
              f"{1 / metrics['eval/examples']:.4f}" if name.startswith("retrieval/") else "")
    print(f"{name:<34}{value:>8.3f}{chance:>9}")
