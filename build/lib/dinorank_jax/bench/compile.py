"""Compile-time suite: what building the trainer's programs costs.

At a shape of `bench.step.SHAPES` (`gpu`: the paper's per-device shape), the
trainer's state initialiser and its train step at orders 0 and 3 are traced,
lowered and compiled from abstract shapes (`jax.ShapeDtypeStruct`: nothing
but the compiler's own memory is allocated), and each reports its jaxpr
equations (top level, and with every sub-program counted once), lowering
and compile seconds and XLA's memory analysis per device
(`compilation.compile_ahead`). With the persistent cache on, a second run on
the same machine reads the compiled programs back: compare its seconds.
"""

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from dinorank_jax import compilation, parallel
from dinorank_jax.bench.step import SHAPES, bench_model, synthetic_batch
from dinorank_jax.checkpoint import abstract_state
from dinorank_jax.step import abstract_inputs, make_train_step, state_initializer


def abstract_batch(mesh, rows: int, shape: dict) -> dict:
  """The train step's batch as shapes, sharded over `BATCH` like
  `parallel.global_batch`'s arrays (one synthetic row gives the fields)."""
  sharding = NamedSharding(mesh, P(parallel.BATCH))
  one = synthetic_batch(1, shape["image_size"], shape["teacher"])
  return {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype, sharding=sharding)
          for k, v in one.items()}


def run(shape_name: str, *, orders=(0, 3), rows: int | None = None,
        overrides: dict | None = None) -> list[dict]:
  """One row per program: `init` (the order-3 model's state) and
  `step order r`, each a `compile_ahead` report plus its name."""
  shape = SHAPES[shape_name]
  mesh = parallel.make_mesh()
  size = shape["image_size"]
  batch = abstract_batch(mesh, (rows or shape["rows"]) * mesh.devices.size, shape)
  table = []
  for order in sorted(set(orders) | {3}):
    model, objective, tx = bench_model(order, shape, overrides=overrides)
    init, shardings = state_initializer(model, tx, mesh, size, objective=objective)
    if order == 3:
      _, report = compilation.compile_ahead(init, *abstract_inputs(size))
      table.append({"program": "init", **report})
    if order in orders:
      state = abstract_state(jax.eval_shape(init, *abstract_inputs(size)), shardings)
      step = make_train_step(model, tx, objective, mesh, shardings, steps_per_epoch=1,
                             epochs=64)
      _, report = compilation.compile_ahead(step, state, batch)
      table.append({"program": f"step order {order}", **report})
  return sorted(table, key=lambda r: r["program"] != "init")


def format_table(table, title) -> str:
  mib = lambda r, k: f"{r[k] / 2 ** 20:.0f}" if k in r else "-"
  lines = [title, f"{'program':<14}{'equations':>10}{'(total)':>9}{'lower s':>9}{'compile s':>11}"
                  f"{'args MiB':>10}{'out MiB':>9}{'temp MiB':>10}"]
  for r in table:
    lines.append(f"{r['program']:<14}{r['equations']:>10}{r['equations_total']:>9}"
                 f"{r['lower_seconds']:>9.1f}"
                 f"{r['compile_seconds']:>11.1f}{mib(r, 'argument_bytes'):>10}"
                 f"{mib(r, 'output_bytes'):>9}{mib(r, 'temp_bytes'):>10}")
  total = sum(r["lower_seconds"] + r["compile_seconds"] for r in table)
  lines.append(f"total {total:.1f} s")
  return "\n".join(lines)

