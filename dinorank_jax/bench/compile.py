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
import jax.numpy as jnp
import optax
from jax._src import source_info_util
from jax.extend.core import jaxprs_in_params
from jax.sharding import NamedSharding, PartitionSpec as P

from dinorank_jax import aot, compilation, optim, parallel
from dinorank_jax.bench.step import SCHEDULE, SHAPES, bench_model, synthetic_batch
from dinorank_jax.data.tokenizer import CONTEXT_LENGTH
from dinorank_jax.errors import UserError
from dinorank_jax.losses.contrastive import clip_loss
from dinorank_jax.losses.ranking import rank_losses
from dinorank_jax.models import list_heads
from dinorank_jax.models.layers import REMAT_POLICIES
from dinorank_jax.models.vit import vit_size
from dinorank_jax.step import build, distillation

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

  def program(self, order: int, **overrides):
    """`(model, objective, optimizer, program)` of the order-`order` model
    with `overrides` of `config.model` fields (`step.build`)."""
    overrides = {**self.overrides, **overrides}
    if self.target and overrides.get("attention") == "cudnn":
      raise UserError("attention=cudnn cannot be compiled for a --target: JAX asks the local "
                      "cuDNN library and GPU when it traces that path; compile attention=xla "
                      "here, or time cudnn on the GPU (launch/gpu_bench.sh)")
    model, objective, optimizer = bench_model(order, self.shape, overrides=overrides)
    return model, objective, optimizer, build(model, optimizer, objective, self.mesh,
                                              self.shape["image_size"])

  def _compile(self, jitted, *args) -> tuple:
    """`(compiled, report)`: `compile_ahead`'s, for the target if there is one."""
    if not self.target:
      return compilation.compile_ahead(jitted, *args)
    with compilation.cache_off():
      compiled, report = compilation.compile_ahead(jitted, *args,
                                                   compiler_options=aot.COMPILER_OPTIONS)
    return compiled, report | aot.fit_report(report, aot.device_memory(self.target))

  def batch(self, rows: int | None = None) -> dict:
    """The step's abstract batch at `rows` per device (default: the shape's)."""
    return abstract_batch(self.mesh, (rows or self.shape["rows"]) * self.mesh.devices.size,
                          self.shape)

  def compile_init(self, order: int = 3, **overrides) -> dict:
    program = self.program(order, **overrides)[-1]
    return self._compile(program.init, *program.inputs)[1]

  def compile_step(self, order: int, rows: int | None = None, **overrides) -> dict:
    """The train step at `rows` per device (default: the shape's)."""
    return self.step_executable(order, rows, **overrides)[1]

  def step_executable(self, order: int, rows: int | None = None, **overrides) -> tuple:
    """`(compiled, report)` of the train step at `rows` per device."""
    program = self.program(order, **overrides)[-1]
    return self._compile(program.step, program.abstract, self.batch(rows), SCHEDULE)


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


# Where a jaxpr equation of the train step comes from: the first pattern of
# its flax name stack or of its source file that matches. Sub-programs (a
# scanned block, a checkpointed chunk) inherit their caller's part.
PARTS = (("towers", ("image_tower", "text_tower")),
         ("students", ("student_net", "_projection")),
         ("fusion", ("_fusion",)),
         ("rank terms", ("rank_head", "losses/ranking.py", "losses/plackett_luce.py",
                         "models/rank_head.py")),
         ("contrastive", ("losses/contrastive.py",)),
         ("distillation", ("losses/distill.py", "pooling.py")),
         ("optimiser", ("optax/", "dinorank_jax/optim.py")))


def _part(eqn, inherited: str) -> str:
  frame = source_info_util.user_frame(eqn.source_info.traceback)
  where = f"{eqn.source_info.name_stack} {frame.file_name if frame else ''}"
  for part, patterns in PARTS:
    if any(p in where for p in patterns):
      return part
  return inherited


def equations_by_part(jaxpr, inherited: str = "other", counts=None) -> dict[str, int]:
  """Equations of a traced program (each sub-program counted once, as in
  `compilation.count_equations`) by `PARTS`; the rest is `other` (the
  step's glue: sharding, collectives, metrics)."""
  counts = {} if counts is None else counts
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    part = _part(eqn, inherited)
    counts[part] = counts.get(part, 0) + 1
    for sub in jaxprs_in_params(eqn.params):
      equations_by_part(sub, part, counts)
  return counts


def breakdown(shape_name: str, order: int = 3) -> list[dict]:
  """The train step at `order` by part: its equations in the whole step
  (`equations_by_part`), and each part's own program (forward and backward;
  the optimiser's update) traced, lowered and compiled alone for one device
  holding the step's global batch.
  Parts compiled alone miss what XLA shares or fuses across them, so their
  seconds add up to about, not exactly, the whole step's."""
  programs = Programs(shape_name)
  model, objective, optimizer, program = programs.program(order)
  size = programs.shape["image_size"]
  rows = programs.shape["rows"] * programs.mesh.devices.size
  batch, state = programs.batch(), program.abstract
  whole = program.step.trace(state, batch, SCHEDULE)
  by_part = equations_by_part(whole.jaxpr)
  params = state.params
  images = jax.ShapeDtypeStruct((rows, size, size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((rows, CONTEXT_LENGTH), jnp.int32)
  out = jax.eval_shape(lambda p, i, t: model.apply({"params": p}, i, t), params, images, tokens)
  key = jax.random.key(0)
  scalar_sum = lambda tree: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(tree)
                                if jnp.issubdtype(x.dtype, jnp.inexact))

  def model_part(students):
    m = model.clone(students=students)
    p = jax.eval_shape(lambda i, t: m.init(key, i, t), images, tokens)["params"]
    return (jax.jit(jax.grad(lambda p, i, t: scalar_sum(m.apply({"params": p}, i, t)))),
            (p, images, tokens))

  def rank(p, u, v, scale):
    heads = list_heads(model, {"params": p})
    return sum(rank_losses(u, v, scale, image_head=heads[0], text_head=heads[1],
                           tie_key=key, active_order=order, list_len=objective.list_len,
                           high_order_len=objective.high_order_len))

  def distill(out, batch):
    grid = (size // vit_size(model.image_student)[3],) * 2
    return sum(distillation(objective, side, out, batch, grid, key)[0]
               for side in ("image", "text"))

  def update(grads, opt_state, params):
    tx = optimizer(optim.learning_rate(SCHEDULE))
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    return new, opt_state, optim.global_norms(grads, new, updates)

  local = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  parts = {
      "towers": model_part("none"),
      "towers, students, fusion": model_part(model.students),
      "rank terms": (jax.jit(jax.grad(rank, argnums=(0, 1, 2, 3))),
                     (params, out["image"], out["text"], out["scale"])),
      "contrastive": (jax.jit(jax.grad(lambda u, v, s: clip_loss(u, v, s)[0], argnums=(0, 1, 2))),
                      (out["image"], out["text"], out["scale"])),
      "distillation": (jax.jit(jax.grad(distill, allow_int=True)),
                       ({k: out[k] for k in ("image_student", "text_student")}, local)),
      "optimiser": (jax.jit(update), (params, state.opt_state, params)),
  }
  table = []
  for name, (jitted, args) in parts.items():
    report = compilation.compile_ahead(jitted, *args)[1]
    table.append({"part": name, "step_equations": by_part.get(name),
                  "equations_total": report["equations_total"],
                  "lower_seconds": report["lower_seconds"],
                  "compile_seconds": report["compile_seconds"]})
  report = compilation.compile_ahead(program.step, state, batch, SCHEDULE)[1]
  table.append({"part": "whole step", "step_equations": sum(by_part.values()),
                "equations_total": report["equations_total"],
                "lower_seconds": report["lower_seconds"],
                "compile_seconds": report["compile_seconds"], "by_part": by_part})
  return table


def format_breakdown(table, title) -> str:
  lines = [title, f"{'part':<26}{'in step':>9}{'alone':>8}{'lower s':>9}{'compile s':>11}"]
  for r in table:
    lines.append(f"{r['part']:<26}{r['step_equations'] or '-':>9}{r['equations_total']:>8}"
                 f"{r['lower_seconds']:>9.1f}{r['compile_seconds']:>11.1f}")
  by_part = table[-1]["by_part"]
  lines.append("equations of the step by part: " + ", ".join(
      f"{k} {v}" for k, v in sorted(by_part.items(), key=lambda kv: -kv[1])))
  return "\n".join(lines)
