"""Orbax checkpoints: the train state and the data iterator in one step directory.

`workdir/checkpoints/<step>/` holds `state` (the `TrainState`, every array
saved by every process's shards) and `data` (the Grain iterator's position),
so a resumed run continues with exactly the batches it would have seen.
Saves are asynchronous; a step directory counts only once orbax has
committed it, so a run killed mid-save resumes from the last complete one.
Restoring takes an abstract state carrying the *new* shardings, so a
checkpoint written on 8 devices restores onto 4; a checkpoint whose
parameters are not the model's (another layout or architecture) is refused
in one line before orbax is asked to restore it.
"""

import json
import os

import grain
import jax
import orbax.checkpoint as ocp


class IncompatibleCheckpoint(ValueError):
  """The latest checkpoint holds other parameters than the model's; the
  message names the difference and the fix."""


def _param_paths(tree) -> set[str]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves}


def check_params(saved: dict, wanted: dict, where: str) -> None:
  """Raises `IncompatibleCheckpoint` unless `saved` (the checkpoint's
  parameter metadata) has exactly the parameter names of `wanted`."""
  extra, missing = sorted(_param_paths(saved) - _param_paths(wanted)), sorted(
      _param_paths(wanted) - _param_paths(saved))
  if not extra and not missing:
    return
  if any("/block_0/" in p for p in extra) and any("/blocks/" in p for p in missing):
    raise IncompatibleCheckpoint(
        f"{where} holds unrolled encoder layers (block_0, …; written before scanned stacks): "
        "resume it with --config.model.scan=False")
  if any("/blocks/" in p for p in extra) and any("/block_0/" in p for p in missing):
    raise IncompatibleCheckpoint(f"{where} holds scanned encoder layers: resume it with "
                                 "--config.model.scan=True")
  first = (f"it has {extra[0]}, which the model lacks" if extra
           else f"it lacks the model's {missing[0]}")
  raise IncompatibleCheckpoint(f"{where} was written by another model ({first}): resume "
                               "with the config the run was started with (its config.json)")


class Checkpointer:
  """Saves every `save_every` steps (and when forced), keeps `max_to_keep`."""

  def __init__(self, workdir: str, *, save_every: int = 1000, max_to_keep: int = 3,
               asynchronous: bool = True):
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                         options=options)

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

  def restore(self, abstract_state, iterator):
    """The latest complete state (placed as `abstract_state` says), moving
    `iterator` to its saved position; None when there is no checkpoint."""
    step = self.latest_step
    if step is None:
      return None
    path = os.path.join(self.manager.directory, str(step), "state")
    saved = ocp.StandardCheckpointer().metadata(path).item_metadata
    check_params(saved["params"], abstract_state.params,
                 f"checkpoint {step} in {self.manager.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


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
