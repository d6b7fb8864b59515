"""The run prediction (`bench --suite predict`): what a compiled GPU program
moves, read from its HLO (`bench.hlo`), on small programs whose numbers are
known by hand, and the roofline and cost arithmetic (`bench.predict`). The
command itself runs in `launch/gpu_bench.sh`'s test (tests/test_aot.py)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dinorank_jax import aot, compilation
from dinorank_jax.bench import hlo, predict

needs_plugin = pytest.mark.skipif(not aot.plugin_available(),
                                  reason=f"GPU-target compiles need the gpu-aot extra: {aot.EXTRA}")


def _text(jitted, *args) -> str:
  """The HLO of `jitted(*args)` compiled for the arguments' GPU target,
  outside the persistent cache (such an executable cannot be loaded here)."""
  with compilation.cache_off():
    return jitted.lower(*args).compile(aot.COMPILER_OPTIONS).as_text()


@needs_plugin
def test_a_matmul_reads_its_operands_and_writes_its_result_once():
  mesh = Mesh(aot.devices("h100", 1), ("data",))
  shard = NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct((128, 256), jnp.bfloat16, sharding=shard)
  w = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=shard)
  text = _text(jax.jit(lambda x, w: x @ w), x, w)
  found = hlo.read(text, 1)
  assert found["collectives"] == []
  assert found["hbm_bytes"] == (128 * 256 + 256 * 512 + 128 * 512) * 2   # cuBLAS scratch left out


@needs_plugin
def test_a_scanned_stack_is_read_and_written_a_layer_at_a_time():
  """Slicing layer i of a [16, 256, 256] stack reads that layer; updating it
  in place (the buffer donated) writes the update, not the stack (XLA's own
  GPU cost model counts them so)."""
  shard = NamedSharding(Mesh(aot.devices("h100", 1), ("data",)), P())
  stack = jax.ShapeDtypeStruct((16, 256, 256), jnp.float32, sharding=shard)
  layer = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=shard)
  index = jax.ShapeDtypeStruct((), jnp.int32, sharding=shard)
  one = 256 * 256 * 4
  sliced = jax.jit(lambda w, i: jax.lax.dynamic_index_in_dim(w, i, keepdims=False) * 2)
  text = _text(sliced, stack, index)
  assert hlo.read(text, 1)["hbm_bytes"] == one + 4 + one             # the layer, i; the product
  updated = jax.jit(lambda w, x, i: jax.lax.dynamic_update_index_in_dim(w, x * 2, i, 0),
                    donate_argnums=0)
  text = _text(updated, stack, layer, index)
  assert hlo.read(text, 1)["hbm_bytes"] == one + 4 + one             # x, i; the update


@needs_plugin
def test_collectives_are_counted_with_their_group_ring_factor_and_loop_trips():
  # A data-parallel gradient over a scanned stack of 4 layers: one all-reduce
  # of a layer's 256 x 256 float32 gradient per trip of the backward loop.
  def loss(w, x):
    h, _ = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)
    return jnp.mean(h ** 2)
  mesh = Mesh(aot.devices("h100", 8), ("data",))
  w = jax.ShapeDtypeStruct((4, 256, 256), jnp.float32, sharding=NamedSharding(mesh, P()))
  x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  text = _text(jax.jit(jax.grad(loss)), w, x)
  reduced, = hlo.read(text, 8)["collectives"]
  layer = 256 * 256 * 4
  assert (reduced["op"], reduced["n"], reduced["times"]) == ("all-reduce", 8, 4)
  assert reduced["payload_bytes"] == layer and reduced["axes"] == "axis_0"
  assert reduced["sent_bytes"] == 2 * 7 / 8 * layer * 4

  # Gathering a row-sharded 64 x 256 array: each device sends 7/8 of the output.
  replicated = NamedSharding(mesh, P())
  gather = jax.jit(lambda x: jax.lax.with_sharding_constraint(x, replicated) * 2)
  gathered, = hlo.read(_text(gather, x), 8)["collectives"]
  assert (gathered["op"], gathered["n"], gathered["times"]) == ("all-gather", 8, 1)
  assert gathered["sent_bytes"] == 7 / 8 * 64 * 256 * 4


def test_replica_groups_in_each_of_xlas_spellings():
  assert hlo.group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", 8) == (4, "axis_1")
  assert hlo.group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}",
                        8) == (8, "axis_0,axis_1")
  assert hlo.group_size("replica_groups=[2,4]<=[8], to_apply=%add", 8)[0] == 4
  assert hlo.group_size("replica_groups={{0,1},{2,3},{4,5},{6,7}}", 8)[0] == 2
  assert hlo.group_size("replica_groups={}, to_apply=%add", 8)[0] == 8
  assert [hlo.ring_factor(op, 4) for op in hlo.COLLECTIVES] == [1.5, 0.75, 0.75, 0.75, 1.0]


def test_the_roofline_and_the_cost_by_hand():
  h100 = predict.HARDWARE["h100"]
  reduce_1gb = {"op": "all-reduce", "n": 8, "payload_bytes": 10 ** 9, "times": 1,
                "sent_bytes": 2 * 7 / 8 * 10 ** 9}
  inside = predict.roofline(h100, 989.4e12 * 0.1, 3.352e12 * 0.05, [reduce_1gb], 8)
  assert inside["compute_s"] == pytest.approx(0.1) and inside["memory_s"] == pytest.approx(0.05)
  assert inside["communication_s"] == pytest.approx(1.75 / 450)       # NVLink, one node
  assert inside["bound_by"] == "compute" and inside["mfu_ceiling"] == pytest.approx(1.0)
  # Across 8 nodes of 8: 2·7/8 of 1 GB over NVLink, then 2·7/8 of its eighth
  # over each GPU's 50 GB/s port.
  across = predict.roofline(h100, 989.4e12 * 0.001, 0, [{**reduce_1gb, "n": 64}], 64)
  assert across["communication_s"] == pytest.approx(1.75 / 450 + 1.75 / 8 / 50)
  assert across["bound_by"] == "communication"
  assert across["mfu_ceiling"] == pytest.approx(0.001 / across["communication_s"])
  cost = predict.run_cost(0.5, 4096, 8, records=4096 * 1000, epochs=64, usd_per_gpu_hour=2.0)
  assert cost["steps_per_epoch"] == 1000 and cost["epoch_hours"] == pytest.approx(500 / 3600)
  assert cost["run_gpu_hours"] == pytest.approx(500 / 3600 * 8 * 64)
  assert cost["run_usd"] == pytest.approx(cost["run_gpu_hours"] * 2)
