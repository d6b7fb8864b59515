"""Schedules, decay mask and the staged warm-start of method §6."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dinorank_jax import optim
from dinorank_jax.losses.contrastive import clip_loss
from dinorank_jax.losses.ranking import gate_penalty, rank_losses
from dinorank_jax.models import list_heads
from tests.model_sizes import IMAGE, tiny_model, tokens


def _schedule(steps_per_epoch=10, epochs=4, peak_lr=5e-4, warmup_steps=10):
  return optim.Schedule(steps_per_epoch, epochs, peak_lr, warmup_steps)


def test_learning_rate_warms_up_then_decays_to_zero():
  lr = optim.learning_rate(_schedule(steps_per_epoch=25))
  values = np.asarray([lr(s) for s in range(101)])
  assert values[0] == 0 and np.isclose(values[10], 5e-4) and values[100] < 1e-9
  assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) <= 0)


@pytest.mark.parametrize("warmup, total", [(10, 100), (0, 7), (3, 3), (8, 5), (2000, 640_000)])
def test_learning_rate_is_optax_warmup_cosine(warmup, total):
  # The traced schedule computes optax's, term for term, including the
  # degenerate runs (no warm-up; a warm-up as long as the run or longer).
  ours = optim.learning_rate(optim.Schedule(total, 1, 5e-4, warmup))
  theirs = optax.warmup_cosine_decay_schedule(0.0, 5e-4, warmup, max(total, warmup + 1))
  counts = jnp.unique(jnp.linspace(0, total + 5, 301).astype(jnp.int32))
  np.testing.assert_array_equal(jax.vmap(ours)(counts), jax.vmap(theirs)(counts))


def test_rank_weight_schedules():
  linear = [float(optim.rank_weight("rankclip_linear", e * 10, _schedule(), 0.125))
            for e in range(4)]
  np.testing.assert_allclose(linear, [0.0, 0.0625, 0.125, 0.125])
  cosine = [float(optim.rank_weight("cosine", s, _schedule(), 0.125)) for s in (0, 20, 40, 60)]
  np.testing.assert_allclose(cosine, [0.0, 0.0625, 0.125, 0.125], atol=1e-7)
  with pytest.raises(ValueError, match="config.objective.rank_schedule"):
    optim.rank_weight("step", 0, _schedule(), 0.125)


def test_active_order_follows_the_warm_start():
  stages = lambda order, **kw: [int(optim.active_order(s, _schedule(**kw), order))
                                for s in (0, 29, 30, 59, 60, 500)]
  assert stages(3) == [1, 1, 2, 2, 3, 3]
  assert stages(5) == [1, 1, 2, 2, 5, 5]
  assert stages(2) == [1, 1, 2, 2, 2, 2]
  assert stages(1) == [1] * 6 and stages(0) == [0] * 6
  assert stages(3, steps_per_epoch=20) == [1, 1, 1, 1, 2, 3]


def test_the_schedule_is_traced_not_compiled():
  # Every length and the peak learning rate are arguments of one program:
  # values from another run reuse it (the train step's persistent-cache hit).
  @jax.jit
  def values(step, schedule):
    return (optim.learning_rate(schedule)(step), optim.rank_weight("rankclip_linear", step,
            schedule, 0.125), optim.rank_weight("cosine", step, schedule, 0.125),
            optim.active_order(step, schedule, 3))
  first = values(30, _schedule())
  second = values(30, optim.Schedule(7, 64, 1e-3, 2000, warm_start=(1, 2)))
  assert values._cache_size() == 1
  assert [float(x) for x in first] != [float(x) for x in second]
  assert int(second[3]) == 3 and int(first[3]) == 2


@pytest.mark.parametrize("concatenate", [True, False])
def test_global_norms_are_optax_tree_norms(concatenate):
  trees = [{"a": jax.random.normal(jax.random.key(i), (3, 4)), "b": {"c": jnp.arange(5.0) * i},
            "d": jnp.float32(2 - i)} for i in range(3)]
  norms = optim.global_norms(*trees, concatenate=concatenate)
  np.testing.assert_allclose(norms, [optax.tree.norm(t) for t in trees], rtol=1e-6)


def _setup(order=3):
  model = tiny_model(rank_order=order)
  images = jax.random.normal(jax.random.key(0), (8, IMAGE, IMAGE, 3))
  toks = tokens([3, 5, 1, 9, 2, 7, 4, 6])
  return model, model.init(jax.random.key(1), images, toks), images, toks


def test_decay_mask_and_order_tags():
  """The masks are read off the tiny order-3 model's parameter tree (its
  shapes: nothing is computed)."""
  model = tiny_model(rank_order=3)
  params = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((8, IMAGE, IMAGE, 3)),
                          tokens([3, 5, 1, 9, 2, 7, 4, 6]))["params"]
  mask, tags = optim.decay_mask(params), optim.order_tags(params)
  assert not mask["logit_scale"] and not mask["image_rank_head"]["gate_2"]
  assert mask["image_rank_head"]["key_3"]["kernel"]
  assert not mask["image_tower"]["encoder"]["norm"]["scale"]
  head = tags["text_rank_head"]
  assert (head["gate_2"], head["query_2"]["kernel"], head["older_3"]["kernel"], head["gate_3"]) == (2, 2, 3, 3)
  assert set(jax.tree.leaves(tags["image_tower"])) == {0} and tags["logit_scale"] == 0


@pytest.mark.slow
def test_staged_warm_start_freezes_exactly_without_recompiling():
  """Slow: steps across the warm start's stages, through one compiled order-3 step."""
  model, variables, images, toks = _setup()
  schedule = _schedule(steps_per_epoch=2, epochs=20, peak_lr=1e-2, warmup_steps=2)
  tx = optim.adamw(optim.learning_rate(schedule))    # order 2 from step 6, order 3 from step 12
  tags = optim.order_tags(variables["params"])

  def objective(params, active):
    v = {"params": params}
    out = model.apply(v, images, toks)
    image_head, text_head = list_heads(model, v)
    cross, in_modal = rank_losses(out["image"], out["text"], out["scale"], image_head=image_head,
                                  text_head=text_head, active_order=active)
    penalty = sum(gate_penalty(params[h], active) for h in optim.RANK_HEADS)
    return clip_loss(out["image"], out["text"], out["scale"])[0] + cross + in_modal + 1e-4 * penalty

  @jax.jit
  def step(params, opt_state, step):
    active = optim.active_order(step, schedule, 3)
    loss, grads = jax.value_and_grad(objective)(params, active)
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = optim.freeze_inactive(updates, tags, active)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state = variables["params"], tx.init(variables["params"])
  initial = params
  history = []
  for s in range(14):
    params, opt_state, loss = step(params, opt_state, jnp.int32(s))
    history.append((params, loss))
  assert step._cache_size() == 1                      # one compilation across all stages

  order_leaves = lambda p, r: [x for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(tags)) if t == r]
  for s, (p, _) in enumerate(history):
    same2 = all(np.array_equal(a, b) for a, b in zip(order_leaves(p, 2), order_leaves(initial, 2)))
    same3 = all(np.array_equal(a, b) for a, b in zip(order_leaves(p, 3), order_leaves(initial, 3)))
    assert same2 == (s < 6), s                         # moves with the update of step 6
    assert same3 == (s < 12), s

  # Before epoch 3 the loss is the order-1 loss of the same parameters.
  order1 = tiny_model(rank_order=1)
  p = history[2][0]
  trunk = {k: v for k, v in p.items() if k not in optim.RANK_HEADS}
  out = order1.apply({"params": trunk}, images, toks)
  heads = list_heads(order1, {"params": trunk})
  cross, in_modal = rank_losses(out["image"], out["text"], out["scale"], image_head=heads[0],
                                text_head=heads[1])
  expected = clip_loss(out["image"], out["text"], out["scale"])[0] + cross + in_modal
  np.testing.assert_allclose(objective(p, jnp.int32(1)), expected, rtol=1e-6)
