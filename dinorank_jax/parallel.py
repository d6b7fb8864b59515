"""The one place that builds device meshes, places the train state and turns
host batches into global arrays.

The mesh has two axes, `data` × `fsdp`, over every device of every host.
The batch (the rows of every loss) is sharded over both; parameters and
optimiser state are replicated over `data` and, when `fsdp > 1`, sharded over
`fsdp` (ZeRO-3 style: XLA gathers each weight where it is used). With the
default `fsdp = 1` this is plain data parallelism.

`wait_for_all` lines the processes up before a program's first collective.
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
# A compile can take long on a big model; a barrier that gives up sooner than
# that would end a healthy run.
BARRIER_SECONDS = 3600
BATCH = (DATA, FSDP)    # the axes the batch is sharded over; the losses' axis_name


def make_mesh(devices=None, fsdp: int = 1) -> Mesh:
  """A `data` × `fsdp` mesh over `devices` (default: every device of every host).

  Axis types stay `Auto` so `jax.jit` propagates shardings and `shard_map`
  accepts inputs placed by `global_batch` without an explicit reshard.
  """
  devices = jax.devices() if devices is None else devices
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"config.mesh.fsdp={fsdp} must divide the {len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(-1, fsdp), BATCH)


def state_shardings(tree, mesh: Mesh):
  """Shardings of a (possibly abstract) state tree: each leaf's largest
  dimension that the `fsdp` size divides is sharded over `fsdp`; the rest,
  and every leaf when `fsdp = 1`, is replicated. Depends only on shapes, so
  parameters and their Adam moments are placed alike."""
  size = mesh.shape[FSDP]

  def place(leaf):
    spec = [None] * len(leaf.shape)
    if size > 1:
      dims = [d for d in np.argsort(leaf.shape)[::-1] if leaf.shape[d] % size == 0]
      if dims and leaf.shape[dims[0]] >= size:
        spec[dims[0]] = FSDP
    return NamedSharding(mesh, P(*spec))
  return jax.tree.map(place, tree)


def global_batch(mesh: Mesh, local: dict) -> dict:
  """This process's NumPy batch `[b, ...]` -> global arrays `[b · processes, ...]`
  sharded over `BATCH` (the one place batches cross into JAX)."""
  sharding = NamedSharding(mesh, P(BATCH))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def wait_for_all(name: str, seconds: int = BARRIER_SECONDS) -> None:
  """Every process waits here until all have arrived (nothing with one process).

  Call it between compiling a program and running it. Processes finish
  compiling at different times: only process 0 writes the persistent
  compilation cache, so on a rerun it loads the step in seconds while the
  others compile it anew, and the first collective of the step then waits for
  them under the collectives' own short deadline (30 s for CPU gloo), which
  fails the run. This barrier goes through the coordination service, not
  through a device collective, so it waits `seconds`. `name` must be unique
  per call site and run.
  """
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=seconds * 1000)
