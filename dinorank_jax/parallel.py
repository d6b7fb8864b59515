"""The one place that builds device meshes and shardings.

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


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
