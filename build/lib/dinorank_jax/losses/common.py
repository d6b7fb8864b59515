"""Helpers shared by the loss modules: row sharding and accumulation dtype."""

import jax
import jax.numpy as jnp


def accumulation_dtype(x: jax.Array):
  """Losses accumulate in float32, or float64 where the inputs are."""
  return jnp.promote_types(x.dtype, jnp.float32)


def gather_items(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """All rows of the global batch and the global index of the local rows.

  Args:
    x: local rows `[n, D]` (inside `shard_map` over `axis_name`), or the whole
      batch when `axis_name` is None.
  Returns:
    `([N, D] all rows, [n] int32 global indices of the local rows)`.
  """
  n = x.shape[0]
  if axis_name is None:
    return x, jnp.arange(n)
  items = jax.lax.all_gather(x, axis_name, tiled=True)
  return items, jax.lax.axis_index(axis_name) * n + jnp.arange(n)


def global_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Mean of per-row values `[n]` over the rows of every shard."""
  if axis_name is None:
    return jnp.mean(x)
  total = jax.lax.psum(jnp.sum(x), axis_name)
  count = jax.lax.psum(x.shape[0], axis_name)
  return total / count
