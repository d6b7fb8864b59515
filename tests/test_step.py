"""The sharded train step of method §6 eq. 4 on the tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dinorank_jax import optim, parallel
from dinorank_jax.losses.distill import PROJECTED
from dinorank_jax.step import Objective, build
from tests.model_sizes import EOT, IMAGE, tiny_model, tokens
from tests.xla_options import TRAINER


def _batch(b=16, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "image": rng.integers(0, 256, (b, IMAGE, IMAGE, 3), dtype=np.uint8),
      "tokens": np.asarray(tokens([int(n) for n in rng.integers(1, 20, b)])),
      "syn_tokens": np.asarray(tokens([int(n) for n in rng.integers(1, 20, b)])),
      "crop": np.column_stack([rng.uniform(0, 0.3, (b, 2)), rng.uniform(0.5, 0.7, (b, 2))]
                              ).astype(np.float32),
      "flip": rng.integers(0, 2, b).astype(bool),
      "teacher_patches": rng.normal(size=(b, 6, 6, 8)).astype(np.float16),
      "teacher_cls": rng.normal(size=(b, 10)).astype(np.float16),
      "teacher_text_tokens": rng.normal(size=(b, 12, 6)).astype(np.float16),
      "teacher_text_mask": np.arange(12)[None] < rng.integers(2, 12, (b, 1)),
      "teacher_text_pooled": rng.normal(size=(b, 6)).astype(np.float16),
  }


# One step per epoch: order 2 trains from step 3, order 3 from step 6.
SCHEDULE = optim.Schedule(steps_per_epoch=1, epochs=10, peak_lr=1e-3, warmup_steps=1)


def sgd(rate):
  """Plain SGD at a fixed rate, whatever the schedule."""
  return lambda lr: optax.sgd(rate)


def _run(mesh, objective, steps=2, optimizer=optim.adamw, host=None, compiler_options=None,
         initial=None, **model_kw):
  """`(state, metrics of each step, step)`; the step compiled with XLA's
  `compiler_options` when given (`tests/xla_options.py`), and started from
  the host state `initial` when given (else initialised on `mesh`)."""
  model = tiny_model(dtype=jnp.float32, **model_kw)
  host = host or _batch()
  program = build(model, optimizer, objective, mesh, host["image"].shape[1])
  state = (program.new_state() if initial is None else
           jax.device_put(initial, program.shardings))
  step = program.step
  batch = parallel.global_batch(mesh, host)
  run = step.lower(state, batch, SCHEDULE).compile(compiler_options) if compiler_options else step
  history = []
  for _ in range(steps):
    state, metrics = run(state, batch, SCHEDULE)
    history.append(metrics)
  return state, history, step


@pytest.mark.slow
def test_data_parallel_step_equals_one_device_and_fsdp():
  """The step on 8 devices against the same step on 1 and on an FSDP mesh of
  2 × 4, from the same state and batch.
  Slow: three steps compiled at the trainer's optimisation level (tests/xla_options.py); the
  8-device one serves both comparisons. The state is initialised once and placed on each mesh."""
  # RKD is defined across each shard's own rows, so it is off for this comparison.
  objective = Objective(beta=0.0, high_order_len=None)
  mesh = parallel.make_mesh()
  initial = jax.device_get(build(tiny_model(dtype=jnp.float32), sgd(1.0), objective, mesh,
                                 IMAGE).new_state())
  # Plain SGD, so parameters differ exactly by the gradients' differences
  # (Adam would turn float noise in near-zero gradients into lr-sized steps);
  # the trainer's XLA options, for which the bounds below are derived.
  run = lambda mesh: _run(mesh, objective, optimizer=sgd(1.0), compiler_options=TRAINER,
                          initial=initial)
  s8, m8, _ = run(mesh)
  s1, m1, _ = run(parallel.make_mesh(jax.devices()[:1]))
  for a, b in zip(m8, m1):
    for k in ("loss", "clip", "rank_cross", "rank_in", "distill_image", "distill_text"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
  _assert_params_close(s8.params, s1.params)
  fsdp, _, _ = run(parallel.make_mesh(fsdp=4))
  sharded = [x for x in jax.tree.leaves(fsdp.params) if parallel.FSDP in x.sharding.spec]
  assert len(sharded) > 10                                   # parameters are split over fsdp
  _assert_params_close(fsdp.params, s8.params)


def _assert_params_close(params, expected):
  """Leaf by leaf, relative to the leaf's norm (a leaf mixes large and tiny entries);
  the absolute floor covers leaves whose gradient is zero in exact arithmetic
  (attention key biases: softmax ignores them), where only rounding noise moves."""
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 1e-6, jax.tree_util.keystr(path)


@pytest.mark.slow
def test_full_objective_trains_without_recompiling():
  """Slow: the whole order-3 objective, compiled once and run three steps."""
  state, history, step = _run(parallel.make_mesh(), Objective(), steps=3, rank_order=3)
  assert step._cache_size() == 1 and int(state.step) == 3
  for metrics in history:
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(metrics))
  first = history[0]
  assert float(first["distill_image"]) > 0 and float(first["distill_text"]) > 0
  assert float(first["image_rkd_distance"]) > 0 and int(first["active_order"]) == 1
  assert float(history[-1]["loss"]) < float(first["loss"])


@pytest.mark.slow
def test_objective_assembles_equation_4():
  """Slow: the step on one device plus the model's forward pass, each compiled, to rebuild eq. 4."""
  from dinorank_jax.losses.distill import align_teacher_grid
  from dinorank_jax.losses.distill import gram_loss
  from dinorank_jax.models.vit import normalise_images
  objective = Objective(beta=0.0, alpha_image=0.7, alpha_text=0.3, fusion_gate=0.05,
                        rank_gate=0.02)
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = tiny_model(dtype=jnp.float32)
  host = _batch()
  program = build(model, sgd(0.0), objective, mesh, host["image"].shape[1])
  state, step = program.new_state(), program.step
  params = jax.tree.map(np.asarray, state.params)
  _, m = step(state, parallel.global_batch(mesh, host), SCHEDULE)
  expected = (m["clip"] + m["rank_weight"] * (m["rank_cross"] + m["rank_in"])
              + 0.7 * m["distill_image"] + 0.3 * m["distill_text"]
              + 0.05 * m["fusion_gate"] + 0.02 * m["rank_gate_penalty"])
  np.testing.assert_allclose(m["loss"], expected, rtol=1e-6)
  assert float(m["rank_weight"]) == 0.0                    # cosine ramp starts at 0
  # The image term is the Gram loss against the crop-aligned teacher grid.
  out = model.apply({"params": params}, normalise_images(jnp.asarray(host["image"])),
                    jnp.asarray(host["tokens"]))
  teacher = align_teacher_grid(jnp.asarray(host["teacher_patches"]), jnp.asarray(host["crop"]),
                               jnp.asarray(host["flip"]), (4, 4))
  np.testing.assert_allclose(m["distill_image"],
                             gram_loss(out["image_student"]["tokens"], teacher), rtol=1e-5)
  gates = jnp.stack([jnp.mean(out["image_gate"] ** 2), jnp.mean(out["text_gate"] ** 2)])
  np.testing.assert_allclose(m["fusion_gate"], jnp.mean(gates), rtol=1e-5)


@pytest.mark.slow
def test_nonfinite_step_is_skipped_when_asked():
  """Slow: skipping is part of the compiled step, so both settings compile a step."""
  mesh = parallel.make_mesh()
  model = tiny_model(dtype=jnp.float32)
  host = _batch()
  host["teacher_patches"][0] = np.inf                      # poisons the image distillation
  for skip in (True, False):
    program = build(model, optim.adamw, Objective(), mesh, host["image"].shape[1],
                    skip_nonfinite=skip)
    state, step = program.new_state(), program.step
    before = jax.tree.map(np.asarray, state.params)
    state, m = step(state, parallel.global_batch(mesh, host), SCHEDULE)
    assert not bool(m["finite"]) and not np.isfinite(float(m["distill_image"]))
    same = all(np.array_equal(a, np.asarray(b))
               for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)))
    assert same == skip


def test_cyclip_objective_adds_both_regularisers():
  mesh = parallel.make_mesh()
  objective = Objective(cyclic_in=0.25, cyclic_cross=0.5)
  state, history, _ = _run(mesh, objective, steps=2, optimizer=sgd(0.1), students="none",
                           rank_order=0)
  for m in history:
    assert float(m["cyclic_in"]) > 0 and float(m["cyclic_cross"]) > 0
    expected = (m["clip"] + m["rank_weight"] * (m["rank_cross"] + m["rank_in"])
                + 0.25 * m["cyclic_in"] + 0.5 * m["cyclic_cross"]
                + 1e-4 * m["rank_gate_penalty"])
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-6)


@pytest.mark.slow
def test_alip_objective_trains_both_paths_and_carries_its_momenta():
  """Slow: ALIP's step and plain CLIP's, each compiled, compared on the same batch."""
  from dinorank_jax.losses.alip import consistency_gates
  from dinorank_jax.losses.contrastive import clip_loss
  from dinorank_jax.models import DinoRankCLIP
  from dinorank_jax.models.vit import normalise_images
  mesh = parallel.make_mesh()
  objective = Objective(alip=True)
  state, history, _ = _run(mesh, objective, optimizer=sgd(0.0), students="none", rank_order=0)
  # Step 1's terms: the gated InfoNCE of each path, from the initial momenta.
  model, host = tiny_model(dtype=jnp.float32, students="none", rank_order=0), _batch()
  variables = {"params": state.params}
  out = model.apply(variables, normalise_images(jnp.asarray(host["image"])), host["tokens"])
  caption = model.apply(variables, host["syn_tokens"], method=DinoRankCLIP.embed_texts)["text"]
  weights, _, _ = consistency_gates(out["image"], out["text"], caption, jnp.ones(3))
  for term, text, w in (("clip", out["text"], weights["text"]),
                        ("clip_caption", caption, weights["caption"])):
    expected = clip_loss(out["image"], text, out["scale"], weights=w)[0]
    np.testing.assert_allclose(history[0][term], expected, rtol=1e-5, err_msg=term)
  for m in history:
    expected = (m["clip"] + m["clip_caption"] + m["rank_weight"] * (m["rank_cross"] + m["rank_in"])
                + 1e-4 * m["rank_gate_penalty"])
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-6)
    assert 0.0 < float(m["alip_sample_weight"]) < 1.0
  momenta = np.asarray(state.stats["alip_momenta"])
  assert np.all(momenta < 1.0)                           # moved from 1 towards the batch means
  np.testing.assert_allclose(history[-1]["alip_momentum_image_text"], momenta[1], rtol=1e-6)
  # Synthetic captions equal to the raw ones: CLIP on each path, weights 1.
  host = _batch()
  host["syn_tokens"] = host["tokens"]
  state, history, _ = _run(mesh, objective, optimizer=sgd(0.1), host=host, students="none",
                           rank_order=0)
  _, plain, _ = _run(mesh, Objective(), optimizer=sgd(0.1), host=host, students="none",
                     rank_order=0)
  for m, p in zip(history, plain):
    assert float(m["alip_sample_weight"]) == 1.0 and float(m["alip_text_weight"]) == 1.0
    np.testing.assert_allclose(m["clip_caption"], m["clip"], rtol=1e-6)
  np.testing.assert_allclose(history[0]["clip"], plain[0]["clip"], rtol=1e-6)


@pytest.mark.parametrize("criterion", PROJECTED)
def test_projected_distillation_criteria_train(criterion):
  # The text student's projected tokens are pooled to the teacher's slots like its tokens.
  # Order 0: the rank heads have no part in distillation, and the step is smaller without them.
  _, history, _ = _run(parallel.make_mesh(), Objective(criterion=criterion), steps=1,
                       image_teacher_dims=(8, 10), text_teacher_dims=(6, 6), rank_order=0)
  assert np.isfinite(float(history[0]["loss"])) and float(history[0]["distill_text"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("students", ["both", "none"])
def test_accumulated_step_equals_the_whole_batch_step(students):
  """`accum_steps=4` (micro-batches of B/4) gives the batch-B step: the same
  loss terms and parameters (float32, 1e-5), with every negative kept.
  Captions are distinct: RKD's distance of two identical captions is zero,
  where its gradient is a subgradient that float rounding can flip.
  Slow: accumulation is part of the compiled step, so both settings compile one."""
  objective = Objective(high_order_len=None)
  mesh = parallel.make_mesh()
  host = _batch(b=32)
  rng = np.random.default_rng(1)
  host["tokens"] = np.zeros((32, 77), np.int32)
  for row, n in zip(host["tokens"], rng.integers(3, 20, 32)):
    row[:n + 2] = [98, *rng.integers(1, 90, n), EOT]
  results = []
  for accum in (1, 4):
    model = tiny_model(dtype=jnp.float32, students=students)
    program = build(model, sgd(1.0), objective, mesh, IMAGE, accum_steps=accum)
    state, step = program.new_state(), program.step
    state, metrics = step(state, parallel.global_batch(mesh, host), SCHEDULE)
    results.append((state, metrics))
  (whole, m1), (accumulated, m4) = results
  for k in ("loss", "clip", "rank_cross", "rank_in", "grad_norm"):
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, err_msg=k)
  _assert_params_close(accumulated.params, whole.params)


def test_gradient_clipping_bounds_the_update():
  # Clipping sees only the gradients' global norm: the model without students will do.
  mesh = parallel.make_mesh()
  model = tiny_model(dtype=jnp.float32, students="none")
  objective = Objective()
  program = build(model, sgd(1.0), objective, mesh, IMAGE, clip_grad_norm=0.01)
  state, step = program.new_state(), program.step
  _, metrics = step(state, parallel.global_batch(mesh, _batch()), SCHEDULE)
  assert metrics["grad_norm"] > 0.01                       # logged before clipping
  np.testing.assert_allclose(metrics["update_norm"], 0.01, rtol=1e-3)   # SGD(1): update = grad
