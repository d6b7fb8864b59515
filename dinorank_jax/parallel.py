"""The one place that builds device meshes and turns host batches into global arrays.

Axis names: `data` shards the batch (rows of every loss) across all devices
of all hosts.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D `data` mesh over `devices` (default: every device of every host).

  Axis types stay `Auto` so `jax.jit` propagates shardings and `shard_map`
  accepts inputs placed by `batch_sharding` without an explicit reshard.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA,))


def global_batch(mesh: Mesh, local: dict) -> dict:
  """This process's NumPy batch `[b, ...]` -> global arrays `[b · processes, ...]`
  sharded over `data` (the one place batches cross into JAX)."""
  sharding = NamedSharding(mesh, P(DATA))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
