"""Exact resume of state and batches; restore onto a different mesh."""


import jax
import orbax.checkpoint as ocp
import numpy as np
import pytest

from dinorank_jax import checkpoint, errors, export, optim, parallel
from dinorank_jax.checkpoint import Checkpointer, abstract_state
from dinorank_jax.data import build as build_data, pipeline
from dinorank_jax.step import Objective, build
from tests.model_sizes import IMAGE, tiny_model


def _dataset(tmp_path):
  out = str(tmp_path / "data")
  args = build_data.parser().parse_args(["--source", "synthetic", "--out", out, "--num", "48",
                                    "--image_size", "48", "--shard_size", "16", "--workers", "1"])
  build_data.build(args)
  return out


def _trainer(data, mesh):
  model = tiny_model(students="none", rank_order=2)
  stream = pipeline.make_dataset(data, batch_size=16, image_size=IMAGE, seed=0)
  iterator = iter(stream)
  first = next(iter(stream))
  program = build(model, optim.adamw, Objective(high_order_len=None), mesh,
                  first["image"].shape[1])
  state, step = program.new_state(), program.step
  schedule = optim.Schedule(steps_per_epoch=3, epochs=4, peak_lr=1e-3, warmup_steps=2)
  return state, lambda state, batch: step(state, batch, schedule), iterator


def _train(state, step, iterator, mesh, n, seen):
  for _ in range(n):
    batch = next(iterator)
    seen.append(batch["image"].copy())
    state, _ = step(state, parallel.global_batch(mesh, batch))
  return state


@pytest.mark.slow
def test_resume_gives_identical_parameters_and_batches(tmp_path):
  """Slow: a straight run and a saved-and-restored one, each a compiled step with the data
  pipeline."""
  data, mesh = _dataset(tmp_path), parallel.make_mesh()
  straight_batches, resumed_batches = [], []
  state, step, iterator = _trainer(data, mesh)
  straight = jax.device_get(_train(state, step, iterator, mesh, 8, straight_batches))

  state, step, iterator = _trainer(data, mesh)
  state = _train(state, step, iterator, mesh, 5, resumed_batches)       # crosses an epoch
  saver = Checkpointer(str(tmp_path / "run"), save_every=1)
  saver.save(5, state, iterator.get_state())
  saver.wait()
  saver.close()
  del state, iterator                                                     # a new process
  fresh, step, iterator = _trainer(data, mesh)
  restorer = Checkpointer(str(tmp_path / "run"))
  state = restorer.restore(abstract_state(fresh, parallel.state_shardings(fresh, mesh)), iterator,
                           16)
  assert restorer.latest_step == 5 and int(state.step) == 5
  resumed = jax.device_get(_train(state, step, iterator, mesh, 3, resumed_batches))
  for a, b in zip(straight_batches, resumed_batches):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)                                   # bit-exact on CPU


def test_checkpoint_from_8_devices_restores_on_4(tmp_path):
  data = _dataset(tmp_path)
  eight, four = parallel.make_mesh(), parallel.make_mesh(jax.devices()[:4])
  state, step, iterator = _trainer(data, eight)
  state = _train(state, step, iterator, eight, 2, [])
  saver = Checkpointer(str(tmp_path / "run"), save_every=1)
  saver.save(2, state, iterator.get_state())
  saver.wait()
  restored = Checkpointer(str(tmp_path / "run")).restore(
      abstract_state(state, parallel.state_shardings(state, four)), iter(pipeline.make_dataset(
          data, batch_size=16, image_size=IMAGE, seed=0)), 16)
  leaf = jax.tree.leaves(restored.params)[0]
  assert leaf.sharding.mesh.devices.size == 4
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_cpu_save_compiles_nothing_and_restores_every_replicated_array(tmp_path):
  """On CPUs each array is saved whole from one replica: orbax's
  replica-parallel saving would compile a slicing program per shape in every
  process (`checkpoint.whole_replicas_on_cpu`)."""
  import jax.monitoring
  mesh = parallel.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  state = {f"w{n}": jax.device_put(rng.normal(size=(n, 3 * n)).astype(np.float32), replicated)
           for n in (8, 16, 24, 40)}
  compiles = []
  listen = lambda event, seconds, **_: compiles.append(event) if event.endswith(
      "backend_compile_duration") else None
  saver = Checkpointer(str(tmp_path / "run"), save_every=1)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    saver.save(1, state, {"position": 1})
    saver.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiles == []
  restored = saver.manager.restore(1, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(state)))["state"]
  for key, value in state.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value))


def test_the_best_checkpoint_is_kept_beside_the_last_ones_and_exported_as_best(tmp_path):
  workdir = str(tmp_path / "run")
  best = checkpoint.Best(workdir, "eval/wds/x/acc1", "max")
  saver = Checkpointer(workdir, save_every=1, max_to_keep=2, best=best)
  for step, value in zip(range(1, 7), (0.1, 0.5, 0.3, 0.2, 0.4, 0.45)):
    saver.save(step, {"params": {"w": np.full(3, step, np.float32)}}, {"position": step})
    saver.wait()
    best.update(step, {"eval/wds/x/acc1": value, "loss": 1.0})
  assert sorted(saver.manager.all_steps()) == [2, 5, 6]       # the best and the last two
  saver.close()
  assert checkpoint.read_best(workdir) == {"metric": "eval/wds/x/acc1", "mode": "max",
                                           "step": 2, "value": 0.5}
  params, step = export.trained_params(workdir, "best")
  assert step == 2 and np.asarray(params["w"]).tolist() == [2, 2, 2]
  # A resumed run carries on from the file with the same metric and mode, not with others.
  assert checkpoint.Best(workdir, "eval/wds/x/acc1", "max").step == 2
  assert checkpoint.Best(workdir, "eval/wds/x/acc1", "min").step is None
  smaller = checkpoint.Best(str(tmp_path / "other"), "loss", "min")
  assert smaller.update(3, {"loss": 2.0}, write=False) and not smaller.update(4, {"loss": 2.5})
  assert not smaller.update(5, {"acc": 0.0}) and smaller.step == 3
  with pytest.raises(errors.UserError, match=r"--step best: .* keeps no best checkpoint"):
    export.trained_params(str(tmp_path / "other"), "best")
