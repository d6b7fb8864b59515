"""Orbax checkpoints: the train state and the data iterator in one step directory.

`workdir/checkpoints/<step>/` holds `state` (the `TrainState`, every array
saved by every process's shards) and `data` (the Grain iterator's position),
so a resumed run continues with exactly the batches it would have seen.
Saves are asynchronous; a step directory counts only once orbax has
committed it, so a run killed mid-save resumes from the last complete one.
Restoring takes an abstract state carrying the *new* shardings, so a
checkpoint written on 8 devices restores onto 4; a checkpoint whose
parameters are not the model's (another layout, architecture or shape) is
refused in one line before orbax is asked to restore it. A checkpoint that
fails to restore (damaged files) is reported in one line, its step and why,
and the one before it is tried; nothing is deleted.
"""

import contextlib
import gc
import json
import logging
import os
import sys

import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
# The default jax.Array handler's metadata store; not exported by orbax.
from orbax.checkpoint._src.metadata import array_metadata_store

from dinorank_jax.errors import UserError


class IncompatibleCheckpoint(UserError, ValueError):
  """The latest checkpoint holds other parameters than the model's; the
  message names the difference and the fix."""


class UnrestorableCheckpoints(UserError, RuntimeError):
  """No checkpoint of the workdir could be restored; the message lists why."""


def _param_shapes(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(getattr(x, "shape", ()))
          for path, x in leaves}


def _param_paths(tree) -> set[str]:
  return set(_param_shapes(tree))


def _reason(error: BaseException) -> str:
  """The innermost cause of an orbax failure, on one line."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


def check_params(saved: dict, wanted: dict, where: str) -> None:
  """Raises `IncompatibleCheckpoint` unless `saved` (the checkpoint's
  parameter metadata) has exactly the parameter names of `wanted`."""
  extra, missing = sorted(_param_paths(saved) - _param_paths(wanted)), sorted(
      _param_paths(wanted) - _param_paths(saved))
  if any("/block_0/" in p for p in extra) and any("/blocks/" in p for p in missing):
    raise IncompatibleCheckpoint(
        f"{where} holds unrolled encoder layers (block_0, …; written before scanned stacks): "
        "resume it with --config.model.scan=False")
  if any("/blocks/" in p for p in extra) and any("/block_0/" in p for p in missing):
    raise IncompatibleCheckpoint(f"{where} holds scanned encoder layers: resume it with "
                                 "--config.model.scan=True")
  if not extra and not missing:
    saved_shapes, wanted_shapes = _param_shapes(saved), _param_shapes(wanted)
    differ = sorted(p for p in wanted_shapes if saved_shapes[p] != wanted_shapes[p])
    if not differ:
      return
    p = differ[0]
    raise IncompatibleCheckpoint(
        f"{where} was written by another model ({p} has shape {saved_shapes[p]}, the model's "
        f"is {wanted_shapes[p]}): resume with the config the run was started with (its "
        "config.json)")
  first = (f"it has {extra[0]}, which the model lacks" if extra
           else f"it lacks the model's {missing[0]}")
  raise IncompatibleCheckpoint(f"{where} was written by another model ({first}): resume "
                               "with the config the run was started with (its config.json)")


class _OrbaxNotices(logging.Filter):
  """Two orbax warnings that report nothing wrong, dropped (real damage is
  still reported): `Metadata file does not exist: …/_CHECKPOINT_METADATA`
  when a checkpoint's item (`N/state`) is read on its own, as every resume
  and export does (that optional file lives one level up, at `N/`); and
  `Type handler registry type … overriding …` when `whole_replicas_on_cpu`
  replaces the array handler, as it means to."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not (message.startswith("Metadata file does not exist")
                or message.startswith("Type handler registry type"))


def quiet_orbax_noise() -> None:
  """Installs `_OrbaxNotices` on absl's logger (orbax logs through it) and
  `_closed_loop_errors_dropped` as the unraisable hook, once."""
  absl_log = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxNotices) for f in absl_log.filters):
    absl_log.addFilter(_OrbaxNotices())
  if not getattr(sys.unraisablehook, "drops_closed_loop_errors", False):
    sys.unraisablehook = _closed_loop_errors_dropped(sys.unraisablehook)


def whole_replicas_on_cpu() -> None:
  """On CPUs, saves each array from one replica, whole.

  Orbax's default there, replica-parallel saving, has each replica of an
  array write a slice of it. On CPUs every replica sits in the same host
  memory, so the split saves no copying, but it slices each shape with a
  program of its own, compiled in every process: 5-9 s of the first save
  of the tiny test config on 8 devices, whose whole launch then takes 13 s
  instead of 22 s (docs/performance.md). GPU and TPU keep orbax's default.
  The files hold the same values either way (only their chunks differ), so
  checkpoints written either way restore."""
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()),
        override=True)


def _closed_loop_errors_dropped(hook):
  """`hook`, except for what a failed restore leaves behind after it:
  tensorstore's reads still in flight finish on its own threads and post
  their results to orbax's event loop, closed by then (`RuntimeError: Event
  loop is closed`), and orbax's abandoned read coroutines are finalised with
  their errors unretrieved. Each is an unraisable error printed as a
  traceback (dozens per failed checkpoint, some after the run's one-line
  error); the failure itself has been reported."""

  def dropping(unraisable):
    value, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    closed_loop = isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
    orbax_read = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
    if not (closed_loop or orbax_read):
      hook(unraisable)

  dropping.drops_closed_loop_errors = True
  return dropping


@contextlib.contextmanager
def _quiet_failed_reads():
  """Orbax's failed reads leave one unretrieved asyncio error and one
  unraisable coroutine per array (hundreds of chained tracebacks); the
  failure itself is reported in one line, so these are dropped here."""
  asyncio_log = logging.getLogger("asyncio")
  level, hook = asyncio_log.level, sys.unraisablehook
  asyncio_log.setLevel(logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    gc.collect()              # the abandoned coroutines are finalised while quiet
    asyncio_log.setLevel(level)
    sys.unraisablehook = hook


class MissingMetadata(ValueError):
  """A step's `state/_METADATA` (the tree of what it saved) is missing or empty."""


def read_metadata(path: str) -> dict:
  """The tree metadata of the orbax item at `path`; `MissingMetadata` when
  orbax finds none (it returns None for a missing `_METADATA`, and logs that)."""
  with _quiet_absl_warnings():
    saved = ocp.StandardCheckpointer().metadata(path).item_metadata
  if not saved or "params" not in saved:
    raise MissingMetadata(f"{os.path.join(path, '_METADATA')} is missing or holds no params")
  return saved


@contextlib.contextmanager
def _quiet_absl_warnings():
  """Orbax logs a warning before returning no metadata; the caller says it in one line."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_log.setLevel(level)


BEST_FILE = "best.json"
MODES = ("max", "min")


class Best:
  """The best checkpoint by one logged metric (`config.eval.keep_best`, the
  larger value with `mode` max, the smaller with min): its step and value,
  in `WORKDIR/best.json`. As an orbax preservation policy it keeps that
  step's checkpoint beside the last `max_to_keep`. A run resumed with the
  same metric and mode carries on from the file."""

  def __init__(self, workdir: str, metric: str, mode: str = "max"):
    self.path, self.metric, self.mode = os.path.join(workdir, BEST_FILE), metric, mode
    self.step = self.value = None
    saved = read_best(workdir)
    if saved and saved["metric"] == metric and saved["mode"] == mode:
      self.step, self.value = saved["step"], saved["value"]

  def should_preserve(self, checkpoints, *, context):
    del context
    return [checkpoint.step == self.step for checkpoint in checkpoints]

  def update(self, step: int, metrics: dict, *, write: bool = True) -> bool:
    """Takes `step` as the best when its `metric` beats the best so far;
    True when it does (the file is rewritten when `write`)."""
    value = metrics.get(self.metric)
    if value is None or not (self.value is None or (value > self.value if self.mode == "max"
                                                     else value < self.value)):
      return False
    self.step, self.value = step, float(value)
    if write:
      with open(self.path + ".tmp", "w") as f:
        json.dump({"metric": self.metric, "mode": self.mode, "step": step,
                   "value": self.value}, f)
      os.replace(self.path + ".tmp", self.path)
    return True


def read_best(workdir: str) -> dict | None:
  """`WORKDIR/best.json` (`Best`), or None when the run keeps no best checkpoint."""
  try:
    with open(os.path.join(workdir, BEST_FILE)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def saved_steps(workdir: str) -> list[int]:
  """The steps of a run's complete checkpoints, ascending; reads the
  directory only (safe on any process of a job, with or without a run)."""
  return sorted(ocp.path.step.checkpoint_steps(os.path.abspath(os.path.join(workdir,
                                                                           "checkpoints"))))


class Checkpointer:
  """Saves every `save_every` steps (and when forced), keeps `max_to_keep`
  and, with `best` (a `Best`), the best step's checkpoint too."""

  def __init__(self, workdir: str, *, save_every: int = 1000, max_to_keep: int = 3,
               asynchronous: bool = True, best: Best | None = None):
    self.save_every = save_every
    keep = ({"preservation_policy": ocp.checkpoint_managers.AnyPreservationPolicy(
        [ocp.checkpoint_managers.LatestN(max_to_keep), best])} if best is not None
            else {"max_to_keep": max_to_keep})
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=asynchronous, **keep)
    self.manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                         options=options)
    quiet_orbax_noise()
    whole_replicas_on_cpu()

  @property
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Starts a save of `state` and the data iterator's `data_state` (its
    `get_state()` taken where the next batch to train on is the first it
    yields) at `step`, if due (or forced) and not saved already."""
    if step == self.manager.latest_step() or not (force or step % self.save_every == 0):
      return False
    return self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_state))))

  def restore(self, abstract_state, iterator, global_batch: int):
    """The latest state that restores (placed as `abstract_state` says),
    moving `iterator` to its saved position (`_restore`: on any number of
    processes); None when there is no checkpoint. A damaged checkpoint is
    reported and the previous one tried; `UnrestorableCheckpoints` when none
    restores."""
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      where = f"checkpoint {step} in {self.manager.directory}"
      try:
        saved = read_metadata(os.path.join(self.manager.directory, str(step), "state"))
      except Exception as e:  # orbax raises many types for damaged metadata
        failures.append(f"{step}: {_reason(e)}")
        logging.warning("%s cannot be read (%s); trying the one before", where, _reason(e))
        continue
      check_params(saved["params"], abstract_state.params, where)
      try:
        with _quiet_failed_reads():
          restored = self._restore(step, abstract_state, iterator, global_batch)
      except Exception as e:  # damaged array files, damaged data state
        failures.append(f"{step}: {_reason(e)}")
        logging.warning("%s cannot be restored (%s); trying the one before", where, _reason(e))
        continue
      if failures:
        self._set_aside(step)
        logging.warning("resuming from %s instead of the latest", where)
      return restored
    if failures:
      raise UnrestorableCheckpoints(
          f"no checkpoint in {self.manager.directory} restores ({'; '.join(failures)}): move "
          "that directory aside to start afresh")
    return None

  def _restore(self, step: int, abstract_state, iterator, global_batch: int):
    """The state of `step`, and `iterator` at its data position. Written by as
    many processes as now: each process's own iterator state (exact, skipped
    records included). By another count: the position is global — each saved
    state counts the records its process drew, `global_batch / count` of
    every global batch, so `records / share` is the global batches drawn, and
    the global batches do not depend on the process count
    (`pipeline.ProcessBlocks`) — and every process starts at that global
    batch. Exact unless records were skipped: a process that skipped drew
    ahead of the others, and the furthest one decides."""
    data = os.path.join(self.manager.directory, str(step), "data")
    count = jax.process_count()
    saved = _saved_positions(data)
    if not saved or len(saved) == count:
      return self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(iterator)))["state"]
    drawn = max(-(-n // (global_batch // len(saved))) for n in saved)
    state = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
    iterator.set_state({"next_index": drawn * (global_batch // count)})
    logging.info("checkpoint %d holds the data positions of %d processes; resumed on %d at "
                 "global batch %d", step, len(saved), count, drawn)
    return state

  def _set_aside(self, good: int) -> None:
    """Moves the damaged steps after `good` to `workdir/damaged_checkpoints/`
    (kept for inspection), so the run can save those steps again."""
    aside = os.path.join(os.path.dirname(self.manager.directory), "damaged_checkpoints")
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in self.manager.all_steps():
        if step > good:
          os.replace(os.path.join(self.manager.directory, str(step)),
                     os.path.join(aside, str(step)))
          logging.warning("moved the damaged checkpoint %d to %s", step, aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("damaged checkpoints set aside")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _saved_positions(data: str) -> list[int] | None:
  """The records each process had drawn, from the per-process iterator states
  under `data` (`process_<i>-of-<n>.json`, Grain's layout), in process order;
  None when they are not all plain `{"next_index": n}` states."""
  try:
    names = [n for n in os.listdir(data) if n.startswith("process_") and n.endswith(".json")]
    states = {}
    for name in names:
      index, count = map(int, name[len("process_"):-len(".json")].split("-of-"))
      with open(os.path.join(data, name)) as f:
        states[index] = json.load(f)["next_index"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  if not states or sorted(states) != list(range(count)):
    return None
  return [int(states[i]) for i in range(count)]


def abstract_state(tree, shardings):
  """Shapes and dtypes of `tree`, placed by `shardings` (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class _FrozenIteratorState:
  """A data iterator's state taken earlier; Grain's checkpoint handler saves
  what `get_state()` returns (JSON bytes for objects that are not Grain
  iterators), and restores it into the live iterator as usual."""

  def __init__(self, state: dict):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()
