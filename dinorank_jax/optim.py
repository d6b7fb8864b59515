"""Optimisation of method §6: AdamW, its decay mask, the schedules, and the
staged warm-start with exact freezing.

Everything that changes over training — learning rate, rank weights, the
active rank order — is a function of the step number and of the run's
`Schedule`, which the train step takes as an argument. Its lengths (steps
per epoch, epochs, warm-up steps, the warm-start epochs) and the peak
learning rate are traced values, not constants of the program: the step
compiles once, the stage changes without recompiling, and a run resumed with
more epochs or another learning rate reads its step from the persistent
compilation cache.

Warm-start (method §6): epochs 0-2 train order 1 only; order 2 starts at epoch
3, orders ≥ 3 at epoch 6. Before its start an order contributes nothing to
the loss (`HighOrderPL(active_order=…)` zeroes its gate, so its parameters
get exactly zero gradient) and `freeze_inactive` zeroes its updates, so not
even weight decay moves them. Adam's moments of a frozen leaf stay zero
(its gradient is zero) and build up from its start.
"""

from typing import Callable

import flax
import jax
import jax.numpy as jnp
import optax

RANK_SCHEDULES = ("rankclip_linear", "cosine")
WARM_START_EPOCHS = (3, 6)      # first epoch of order 2, and of orders >= 3
RANK_HEADS = ("image_rank_head", "text_rank_head")


@flax.struct.dataclass
class Schedule:
  """The run's lengths and peak learning rate: the train step's third
  argument, traced (Python numbers or scalar arrays), so that none of them
  is compiled into the step."""
  steps_per_epoch: int | jax.Array
  epochs: int | jax.Array
  peak_lr: float | jax.Array
  warmup_steps: int | jax.Array
  warm_start: tuple = WARM_START_EPOCHS    # first epoch of order 2, of orders >= 3

  @property
  def total_steps(self):
    return self.steps_per_epoch * self.epochs


# Builds the optimiser from a learning-rate schedule, inside the train step
# (e.g. `functools.partial(adamw, weight_decay=0.2)`, or `lambda lr: optax.sgd(1.0)`).
Optimizer = Callable[[optax.Schedule], optax.GradientTransformation]


def learning_rate(schedule: Schedule) -> optax.Schedule:
  """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine to 0
  at `total_steps`: `optax.warmup_cosine_decay_schedule(0, peak, W, max(T, W + 1))`,
  term for term, with every length traced."""
  peak = jnp.asarray(schedule.peak_lr, jnp.float32)
  warmup = jnp.asarray(schedule.warmup_steps, jnp.int32)
  decay = (jnp.maximum(schedule.total_steps, warmup + 1) - warmup).astype(jnp.float32)

  def lr(count):
    count = jnp.asarray(count, jnp.int32)
    ramp = -peak * (1 - jnp.clip(count, 0, warmup) / jnp.maximum(warmup, 1)) + peak
    ramp = jnp.where(warmup > 0, ramp, 0.0)       # optax: a zero-step ramp is constant 0
    after = jnp.minimum((count - warmup).astype(jnp.float32), decay)
    cosine = peak * (0.5 * (1 + jnp.cos(jnp.pi * after / decay)))
    return jnp.where(count < warmup, ramp, cosine)
  return lr


def rank_weight(kind: str, step, schedule: Schedule, lambda_max: float) -> jax.Array:
  """`λ(t) = λ_max · w(t)` for the rank terms (method §3).

  `rankclip_linear`: `w(e) = clip(3(e − 1)/(E − 1), 0, 2) / 2` for epoch
  `e = 1 … E` (RankCLIP's public ramp); `cosine`: `w(t) = ½(1 − cos(π t/T))`
  over the `T` steps of the run.
  """
  step = jnp.asarray(step, jnp.float32)
  if kind == "rankclip_linear":
    epoch = jnp.floor(step / schedule.steps_per_epoch) + 1
    w = jnp.clip(3.0 * (epoch - 1) / jnp.maximum(schedule.epochs - 1, 1), 0.0, 2.0) / 2.0
  elif kind == "cosine":
    total = jnp.asarray(schedule.total_steps, jnp.float32)
    w = 0.5 * (1.0 - jnp.cos(jnp.pi * jnp.minimum(step, total) / total))
  else:
    raise ValueError(f"unknown rank schedule {kind!r}: one of {RANK_SCHEDULES} "
                     "(config.objective.rank_schedule)")
  return lambda_max * w


def active_order(step, schedule: Schedule, order: int) -> jax.Array:
  """int32: the highest rank order trained at `step` (traced)."""
  epoch = jnp.asarray(step) // schedule.steps_per_epoch
  first, later = schedule.warm_start
  stage = jnp.where(epoch < first, 1, jnp.where(epoch < later, 2, order))
  return jnp.minimum(stage, order).astype(jnp.int32)


def decay_mask(params):
  """Weight decay on matrices only: no biases, norms, gates or logit scale
  (all of which are scalars or vectors)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def order_tags(params):
  """The rank order each leaf belongs to: `r` for the order-r parameters of a
  rank head (`gate_r`, `key_r`, `query_2`, `older_3`, `layer_4`, …), 0 for
  everything else (always trained)."""
  def tag(path, _):
    names = [getattr(k, "key", None) for k in path]
    for head in RANK_HEADS:
      if head in names and names.index(head) + 1 < len(names):
        return int(str(names[names.index(head) + 1]).rsplit("_", 1)[1])
    return 0
  return jax.tree_util.tree_map_with_path(tag, params)


def freeze_inactive(updates, tags, active) -> object:
  """Zeroes the updates of leaves whose order exceeds `active` (traced);
  order-0 leaves (always trained) are left as they are."""
  return jax.tree.map(lambda u, t: jnp.where(t <= active, u, jnp.zeros_like(u)) if t else u,
                      updates, tags)


def global_norms(*trees, concatenate: bool = True) -> jax.Array:
  """float32 `[len(trees)]`: the global L2 norm of each tree.

  With `concatenate`, each tree's leaves join one vector with one reduction:
  a tree norm per leaf is a few hundred small reductions for XLA to build,
  which costs seconds of compile time at any model size. Leaves sharded
  over `fsdp` must not be joined (that would gather them): `concatenate=False`
  reduces each leaf once for all the trees, as stacked squares.
  """
  if concatenate:
    flat = lambda t: jnp.concatenate([x.reshape(-1).astype(jnp.float32)
                                      for x in jax.tree.leaves(t)])
    return jnp.sqrt(jnp.stack([jnp.sum(jnp.square(flat(t))) for t in trees]))
  per_leaf = [jnp.sum(jnp.stack([jnp.square(x.astype(jnp.float32)) for x in leaves]),
                      axis=tuple(range(1, leaves[0].ndim + 1)))
              for leaves in zip(*map(jax.tree.leaves, trees))]
  return jnp.sqrt(jnp.sum(jnp.stack(per_leaf), axis=0))


def adamw(lr: optax.Schedule, weight_decay: float = 0.2) -> optax.GradientTransformation:
  """AdamW of method §6: β = (0.9, 0.98), ε = 1e-6, decay on matrices only."""
  return optax.adamw(lr, b1=0.9, b2=0.98, eps=1e-6, weight_decay=weight_decay,
                     mask=decay_mask)
