"""Orbax checkpoints: the train state and the data iterator in one step directory.

`workdir/checkpoints/<step>/` holds `state` (the `TrainState`, every array
saved by every process's shards) and `data` (the Grain iterator's position),
so a resumed run continues with exactly the batches it would have seen.
Saves are asynchronous; a step directory counts only once orbax has
committed it, so a run killed mid-save resumes from the last complete one.
Restoring takes an abstract state carrying the *new* shardings, so a
checkpoint written on 8 devices restores onto 4.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P


class Checkpointer:
  """Saves every `save_every` steps (and when forced), keeps `max_to_keep`."""

  def __init__(self, workdir: str, *, save_every: int = 1000, max_to_keep: int = 3,
               asynchronous: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           save_interval_steps=save_every,
                                           enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                         options=options)

  @property
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, iterator, *, force: bool = False) -> bool:
    """Starts a save of `state` and `iterator` at `step` if due (or forced)."""
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))

  def restore(self, abstract_state, iterator):
    """The latest complete state (placed as `abstract_state` says), moving
    `iterator` to its saved position; None when there is no checkpoint."""
    step = self.latest_step
    if step is None:
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def abstract_replicated(tree, mesh):
  """Shapes and dtypes of `tree`, replicated over `mesh` (a restore target)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
