"""Compile-time suite: what building the trainer's programs costs, and
whether they fit a GPU.

At a shape of `bench.step.SHAPES` (`gpu`: the paper's per-device shape), the
trainer's state initialiser and its train step at the chosen orders are
traced, lowered and compiled from abstract shapes (`jax.ShapeDtypeStruct`:
nothing but the compiler's own memory is allocated), and each reports its
jaxpr equations (top level, and with every sub-program counted once),
lowering and compile seconds and XLA's memory analysis per device
(`compilation.compile_ahead`). With the persistent cache on, a second run on
the same machine reads the compiled programs back: compare its seconds.

With a `target` (`aot.TARGETS`) the programs are compiled for `devices`
GPUs of that kind from whatever machine this is (`aot.devices`), and each
row also says whether its peak fits the GPU (`aot.fit_report`); `fit`
searches, for every remat policy and order, the largest rows per device
whose train step fits.
"""

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from dinorank_jax import aot, compilation, parallel
from dinorank_jax.bench.step import SHAPES, bench_model, synthetic_batch
from dinorank_jax.checkpoint import abstract_state
from dinorank_jax.errors import UserError
from dinorank_jax.models.layers import REMAT_POLICIES
from dinorank_jax.step import abstract_inputs, make_train_step, state_initializer

GIB = 2 ** 30


def abstract_batch(mesh, rows: int, shape: dict) -> dict:
  """The train step's batch as shapes, sharded over `BATCH` like
  `parallel.global_batch`'s arrays (one synthetic row gives the fields)."""
  sharding = NamedSharding(mesh, P(parallel.BATCH))
  one = synthetic_batch(1, shape["image_size"], shape["teacher"])
  return {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype, sharding=sharding)
          for k, v in one.items()}


class Programs:
  """The trainer's programs at one shape on one set of devices (this
  machine's, or a GPU target's); `compile_*` return `compile_ahead` reports,
  with `fit_report`'s fields when compiled for a target."""

  def __init__(self, shape_name: str, *, target: str | None = None, devices: int = 8,
               overrides: dict | None = None):
    self.shape, self.target = SHAPES[shape_name], target
    self.overrides = overrides or {}
    self.mesh = parallel.make_mesh(aot.devices(target, devices) if target else None)

  def _model(self, order: int, overrides: dict):
    overrides = {**self.overrides, **overrides}
    if self.target and overrides.get("attention") == "cudnn":
      raise UserError("attention=cudnn cannot be compiled for a --target: JAX asks the local "
                      "cuDNN library and GPU when it traces that path; compile attention=xla "
                      "here, or time cudnn on the GPU (launch/gpu_bench.sh)")
    model, objective, tx = bench_model(order, self.shape, overrides=overrides)
    size = self.shape["image_size"]
    init, shardings = state_initializer(model, tx, self.mesh, size, objective=objective)
    return model, objective, tx, init, shardings

  def _report(self, jitted, *args) -> dict:
    if not self.target:
      return compilation.compile_ahead(jitted, *args)[1]
    with compilation.cache_off():
      _, report = compilation.compile_ahead(jitted, *args,
                                            compiler_options=aot.COMPILER_OPTIONS)
    return report | aot.fit_report(report, aot.device_memory(self.target))

  def compile_init(self, order: int = 3, **overrides) -> dict:
    *_, init, _ = self._model(order, overrides)
    return self._report(init, *abstract_inputs(self.shape["image_size"]))

  def compile_step(self, order: int, rows: int | None = None, **overrides) -> dict:
    """The train step at `rows` per device (default: the shape's)."""
    model, objective, tx, init, shardings = self._model(order, overrides)
    size = self.shape["image_size"]
    state = abstract_state(jax.eval_shape(init, *abstract_inputs(size)), shardings)
    step = make_train_step(model, tx, objective, self.mesh, shardings, steps_per_epoch=1,
                           epochs=64)
    batch = abstract_batch(self.mesh, (rows or self.shape["rows"]) * self.mesh.devices.size,
                           self.shape)
    return self._report(step, state, batch)


def run(shape_name: str, *, orders=(0, 3), rows: int | None = None,
        overrides: dict | None = None, target: str | None = None,
        devices: int = 8) -> list[dict]:
  """One row per program: `init` (the order-3 model's state) and
  `step order r`, each a `compile_ahead` report plus its name."""
  programs = Programs(shape_name, target=target, devices=devices, overrides=overrides)
  table = [{"program": "init", **programs.compile_init()}]
  for order in orders:
    table.append({"program": f"step order {order}", **programs.compile_step(order, rows)})
  return table


def fit(shape_name: str, target: str, *, orders=(0, 3), policies=tuple(REMAT_POLICIES),
        devices: int = 8, overrides: dict | None = None, low: int = 64,
        high: int = 1024, log=print) -> list[dict]:
  """For each order and remat policy, the largest rows per device (a
  multiple of 64 in [low, high]) whose train step fits `target` at JAX's
  default preallocation, with every peak measured on the way."""
  programs = Programs(shape_name, target=target, devices=devices, overrides=overrides)
  limit = int(aot.device_memory(target) * aot.DEFAULT_FRACTION)
  table = []
  for order in orders:
    for policy in policies:
      def peak_at(rows):
        peak = programs.compile_step(order, rows, remat=policy)["peak_bytes"]
        log(f"  {target} order {order} remat={policy} rows {rows}: {peak / GIB:.2f} GiB")
        return peak
      rows, tried = aot.largest_fitting(peak_at, limit, low=low, high=high)
      table.append({"target": target, "devices": devices, "order": order, "remat": policy,
                    "limit_bytes": limit, "largest_rows": rows,
                    "peaks": {str(r): p for r, p in sorted(tried.items())}})
  return table


def format_table(table, title) -> str:
  mib = lambda r, k: f"{r[k] / 2 ** 20:.0f}" if k in r else "-"
  targeted = any("fits" in r for r in table)
  lines = [title, f"{'program':<14}{'equations':>10}{'(total)':>9}{'lower s':>9}{'compile s':>11}"
                  f"{'args MiB':>10}{'out MiB':>9}{'alias MiB':>10}{'temp MiB':>10}"
                  f"{'peak MiB':>10}"
                  + (f"{'fits':>6}{'at 0.95':>9}" if targeted else "")]
  for r in table:
    line = (f"{r['program']:<14}{r['equations']:>10}{r['equations_total']:>9}"
            f"{r['lower_seconds']:>9.1f}"
            f"{r['compile_seconds']:>11.1f}{mib(r, 'argument_bytes'):>10}"
            f"{mib(r, 'output_bytes'):>9}{mib(r, 'alias_bytes'):>10}{mib(r, 'temp_bytes'):>10}"
            f"{mib(r, 'peak_bytes'):>10}")
    if targeted:
      line += f"{'yes' if r['fits'] else 'NO':>6}{'yes' if r['fits_at_0.95'] else 'NO':>9}"
    lines.append(line)
  if targeted:
    r = table[0]
    lines.append(f"device memory {r['device_bytes'] / GIB:.1f} GiB: usable "
                 f"{r['usable_bytes'] / GIB:.1f} GiB at JAX's default preallocation "
                 f"({aot.DEFAULT_FRACTION}), {r['usable_bytes_at_0.95'] / GIB:.1f} GiB at "
                 f"XLA_PYTHON_CLIENT_MEM_FRACTION={aot.MAX_FRACTION}")
  total = sum(r["lower_seconds"] + r["compile_seconds"] for r in table)
  lines.append(f"total {total:.1f} s")
  return "\n".join(lines)


def format_fit(table, title) -> str:
  lines = [title, f"{'target':<8}{'order':>6}{'remat':>10}{'largest rows':>14}"
                  f"{'peak GiB':>10}{'limit GiB':>11}  peaks tried (rows: GiB)"]
  for r in table:
    best = r["largest_rows"]
    peak = f"{r['peaks'][str(best)] / GIB:.1f}" if best else "-"
    tried = ", ".join(f"{k}: {v / GIB:.1f}" for k, v in r["peaks"].items())
    lines.append(f"{r['target']:<8}{r['order']:>6}{r['remat']:>10}"
                 f"{best or 'none fit':>14}{peak:>10}{r['limit_bytes'] / GIB:>11.1f}  {tried}")
  return "\n".join(lines)
