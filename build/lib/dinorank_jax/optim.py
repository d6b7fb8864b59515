"""Optimisation of method §6: AdamW, its decay mask, the schedules, and the
staged warm-start with exact freezing.

Everything that changes over training — learning rate, rank weights, the
active rank order — is a traced function of the step number, so the train
step compiles once and the stage changes without recompiling.

Warm-start (method §6): epochs 0-2 train order 1 only; order 2 starts at epoch
3, orders ≥ 3 at epoch 6. Before its start an order contributes nothing to
the loss (`HighOrderPL(active_order=…)` zeroes its gate, so its parameters
get exactly zero gradient) and `freeze_inactive` zeroes its updates, so not
even weight decay moves them. Adam's moments of a frozen leaf stay zero
(its gradient is zero) and build up from its start.
"""

import jax
import jax.numpy as jnp
import optax

RANK_SCHEDULES = ("rankclip_linear", "cosine")
WARM_START_EPOCHS = (3, 6)      # first epoch of order 2, and of orders >= 3
RANK_HEADS = ("image_rank_head", "text_rank_head")


def learning_rate(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `peak`, then cosine to 0 at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps,
                                            max(total_steps, warmup_steps + 1))


def rank_weight(schedule: str, step, steps_per_epoch: int, epochs: int,
                lambda_max: float) -> jax.Array:
  """`λ(t) = λ_max · w(t)` for the rank terms (method §3).

  `rankclip_linear`: `w(e) = clip(3(e − 1)/(E − 1), 0, 2) / 2` for epoch
  `e = 1 … E` (RankCLIP's public ramp); `cosine`: `w(t) = ½(1 − cos(π t/T))`
  over the `T` steps of the run.
  """
  step = jnp.asarray(step, jnp.float32)
  if schedule == "rankclip_linear":
    epoch = jnp.floor(step / steps_per_epoch) + 1
    w = jnp.clip(3.0 * (epoch - 1) / max(epochs - 1, 1), 0.0, 2.0) / 2.0
  elif schedule == "cosine":
    total = steps_per_epoch * epochs
    w = 0.5 * (1.0 - jnp.cos(jnp.pi * jnp.minimum(step, total) / total))
  else:
    raise ValueError(f"unknown rank schedule {schedule!r}: one of {RANK_SCHEDULES} "
                     "(config.objective.rank_schedule)")
  return lambda_max * w


def active_order(step, steps_per_epoch: int, order: int,
                 starts: tuple[int, int] = WARM_START_EPOCHS) -> jax.Array:
  """int32: the highest rank order trained at `step` (traced)."""
  epoch = jnp.asarray(step) // steps_per_epoch
  stage = jnp.where(epoch < starts[0], 1, jnp.where(epoch < starts[1], 2, order))
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
  """Zeroes the updates of leaves whose order exceeds `active` (traced)."""
  return jax.tree.map(lambda u, t: jnp.where(t <= active, u, jnp.zeros_like(u)), updates, tags)


def adamw(lr: optax.Schedule, weight_decay: float = 0.2) -> optax.GradientTransformation:
  """AdamW of method §6: β = (0.9, 0.98), ε = 1e-6, decay on matrices only."""
  return optax.adamw(lr, b1=0.9, b2=0.98, eps=1e-6, weight_decay=weight_decay,
                     mask=decay_mask)
