"""Train-step benchmark: the cost of each rank order (the paper's Table 5) and MFU.

For each order, the full train step (forward, backward, AdamW update) of the
same model, students and gated fusion on, with the config's default
truncation (`high_order_len` 128), on one synthetic batch, past the staged
warm start so every order is active. All orders are compiled first, then
timed in interleaved rounds (a noisy neighbour slows every order alike);
each time is the median over rounds × repeats, and each ratio is to order 0
of the same run, so it isolates the rank terms.

Shapes: `gpu` is the paper's per-device shape (ViT-B/32 + text B, ViT-Ti/16
students, 224 px, 512 rows per device, bfloat16); `cpu` the demo's model
(tiny/8 trunks, 32 px, 128 rows, float32). The batch is sharded over every
local device, so the global batch is rows × devices.

MFU = analytic model FLOPs of the step (`bench.flops`) / step time / the
devices' peak dense bf16 rate (from the vendor's sheet, or `peak_tflops`).
"""

import functools
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dinorank_jax import config as config_lib
from dinorank_jax import aot, compilation, optim, parallel
from dinorank_jax.bench import against, flops
from dinorank_jax.data.tokenizer import CONTEXT_LENGTH
from dinorank_jax.optim import WARM_START_EPOCHS
from dinorank_jax.step import Objective, TrainProgram, TrainState, build
from dinorank_jax.train import build_model

# The paper's Table 5, "step time" (ms) by rank order.
PAPER_MS = {0: 301, 1: 312, 2: 348, 3: 379, 4: 412, 5: 446}
VOCAB_SIZE, EOT_ID = 49408, 49407
SHAPES = {
    "gpu": {"model": {}, "image_size": 224, "rows": 512, "dtype": "bfloat16",
            "teacher": {"grid": 14, "pca_dim": 256, "cls_dim": 1024, "text_len": 32,
                        "text_dim": 384}},
    "cpu": {"model": {"embed_dim": 64, "image_trunk": "tiny/8", "text_trunk": "tiny",
                      "image_student": "tiny/8", "text_student": "tiny", "rank_head_dim": 16,
                      "remat": "none"},
            "image_size": 32, "rows": 128, "dtype": "float32",
            "teacher": {"grid": 4, "pca_dim": 8, "cls_dim": 10, "text_len": 12, "text_dim": 6}},
}
# One step per epoch, so every rank order is active from step WARM_START_EPOCHS[1].
SCHEDULE = optim.Schedule(steps_per_epoch=1, epochs=64, peak_lr=5e-4, warmup_steps=1)


def peak_tflops(device) -> float | None:
  kind = device.device_kind
  return next((v for k, v in aot.BF16_TFLOPS.items() if k.upper() in kind), None)


def synthetic_batch(rows: int, image_size: int, teacher: dict, seed: int = 0) -> dict:
  """A host batch of the trainer's fields, random but well-formed."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(5, CONTEXT_LENGTH - 1, rows)
  tokens = np.zeros((rows, CONTEXT_LENGTH), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.integers(1, VOCAB_SIZE - 2, n)
    tokens[i, n] = EOT_ID
  grid, text_len = teacher["grid"], teacher["text_len"]
  half = lambda *shape: rng.normal(size=(rows, *shape)).astype(np.float16)
  return {
      "image": rng.integers(0, 256, (rows, image_size, image_size, 3), dtype=np.uint8),
      "tokens": tokens,
      "crop": np.column_stack([rng.uniform(0, 0.3, (rows, 2)),
                               rng.uniform(0.5, 0.7, (rows, 2))]).astype(np.float32),
      "flip": rng.integers(0, 2, rows).astype(bool),
      "teacher_patches": half(grid, grid, teacher["pca_dim"]),
      "teacher_cls": half(teacher["cls_dim"]),
      "teacher_text_tokens": half(text_len, teacher["text_dim"]),
      "teacher_text_mask": np.arange(text_len)[None] < rng.integers(2, text_len, (rows, 1)),
      "teacher_text_pooled": half(teacher["text_dim"]),
  }


def bench_model(order: int, shape: dict, students: str = "both", overrides: dict | None = None):
  """`(model, objective, optimizer)` of the paper's config at `order`, resized
  to `shape`, with `overrides` of `config.model` fields (e.g. `scan`, `remat`)."""
  c = config_lib.paper(order=order, students=students)
  c.model.update(**{**shape["model"], "dtype": shape["dtype"], **(overrides or {})})
  model = build_model(c, {"vocab_size": VOCAB_SIZE, "eot_id": EOT_ID})
  objective = Objective(**c.objective.to_dict())
  return model, objective, functools.partial(optim.adamw, weight_decay=c.optim.weight_decay)


def random_state(program: TrainProgram, optimizer: optim.Optimizer, seed: int = 0) -> TrainState:
  """A state of `program` (`step.build`) with parameters drawn straight from
  its abstract shapes (normal, scaled by 0.02; the values do not matter for
  timing), so no initialiser is compiled on the device. Past the staged warm
  start (one step per "epoch"), so every order is active."""
  shardings = program.shardings
  leaves, treedef = jax.tree.flatten(program.abstract.params)
  sizes = [math.prod(x.shape) for x in leaves]

  def draw(key):
    # One draw, cut into the leaves: a draw per leaf inlines the generator's
    # code once per leaf, and the program took 12x longer to compile (6.7 s
    # against 0.55 s for the CPU shape's 154 leaves).
    values = 0.02 * jax.random.normal(key, (sum(sizes),), jnp.float32)
    parts = jnp.split(values, np.cumsum(sizes)[:-1])
    return treedef.unflatten([p.reshape(x.shape).astype(x.dtype) for p, x in zip(parts, leaves)])
  params = jax.jit(draw, out_shardings=shardings.params)(jax.random.key(seed))
  tx = optimizer(optim.learning_rate(SCHEDULE))
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.int32(WARM_START_EPOCHS[1]), shardings.step)
  return TrainState(step, params, opt_state, {})     # no ALIP statistics


def compile_step(order: int, shape: dict, mesh, host_batch: dict, students: str = "both",
                 overrides: dict | None = None, compiler_options: dict | None = None):
  """`[compiled step, state, batch, model, compile report]` for one model
  (`compilation.compile_ahead`'s report)."""
  model, objective, optimizer = bench_model(order, shape, students, overrides)
  program = build(model, optimizer, objective, mesh, shape["image_size"])
  batch = parallel.global_batch(mesh, host_batch)
  compiled, report = compilation.compile_ahead(program.step, program.abstract, batch, SCHEDULE,
                                               compiler_options=compiler_options)
  return [compiled, random_state(program, optimizer), batch, model, report]


def variant(text: str) -> tuple[dict, dict]:
  """`"attention=cudnn,xla_gpu_enable_latency_hiding_scheduler=true"` ->
  `(config.model overrides, XLA compiler options)`: keys starting `xla_`
  are XLA's flags, the rest `config.model` fields. Values are booleans,
  integers, floats or else strings."""
  model, options = {}, {}

  def typed(value):
    if value.lower() in ("true", "false"):
      return value.lower() == "true"
    for kind in (int, float):
      try:
        return kind(value)
      except ValueError:
        pass
    return value

  for item in filter(None, text.split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"a variant is key=value pairs, got {item!r}")
    (options if key.startswith("xla_") else model)[key] = typed(value)
  return model, options


def _run_steps(run, count):
  for _ in range(count):
    run[1], metrics = run[0](run[1], run[2], SCHEDULE)
  jax.block_until_ready((run[1], metrics))


def measure(models: dict, shape_name: str, *, rows: int | None = None, rounds: int = 3,
            repeats: int = 3, peak: float | None = None,
            profile: tuple[str, str] | None = None,
            overrides: dict | None = None) -> list[dict]:
  """Times each of `models` (`label: (order, students)` or `(order, students,
  variant)`, a `variant` string of model fields and XLA flags) and returns
  one row each: median ms, temporaries, FLOPs, TFLOP/s, MFU. `overrides`
  change `config.model` fields of every model (`bench_model`).
  `profile = (label, directory)` writes a profiler trace of three steps
  (TensorBoard's `*.xplane.pb` and Perfetto's `perfetto_trace.json.gz`)."""
  shape = SHAPES[shape_name]
  mesh = parallel.make_mesh()
  devices = mesh.devices.size
  rows = rows or shape["rows"]
  host = synthetic_batch(rows * devices, shape["image_size"], shape["teacher"])
  runs = {}
  for label, (order, students, *extra) in models.items():
    fields, options = variant(extra[0] if extra else "")
    runs[label] = compile_step(order, shape, mesh, host, students,
                               {**(overrides or {}), **fields}, options or None)
  times = {label: [] for label in runs}
  for run in runs.values():
    _run_steps(run, 1)                                   # warm-up
  for _ in range(rounds):
    for label, run in runs.items():
      for _ in range(repeats):
        start = time.perf_counter()
        _run_steps(run, 1)
        times[label].append(1e3 * (time.perf_counter() - start))
  if profile:
    label, directory = profile
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      _run_steps(runs[label], 3)
  peak = peak or peak_tflops(jax.devices()[0])
  table = []
  for label, run in runs.items():
    ms = statistics.median(times[label])
    total = flops.train_step(run[3], shape["image_size"], rows * devices)["total"]
    achieved = total / (ms / 1e3) / 1e12
    table.append({"model": label, "ms": ms, "rows": rows,
                  "devices": devices, "temp_mib": run[4]["temp_bytes"] / 2 ** 20,
                  "tflop_per_step": total / 1e12, "tflops": achieved,
                  "mfu": achieved / (peak * devices) if peak else None})
  return table


def order_models(orders) -> dict:
  """Table 5's models: the full model (students, gated fusion) at each order."""
  return {f"order {r}": (r, "both") for r in orders}


def variant_models(variants) -> dict:
  """The order-3 model under each variant (`variant`), an A/B against
  `order 3` in the same process."""
  return {f"order 3 [{v}]": (3, "both", v) for v in variants}


def measure_memory(shape_name: str, *, rows: int | None = None, steps: int = 2,
                   overrides: dict | None = None) -> dict:
  """The order-3 step alone (with `overrides` of `config.model` fields, as
  `bench_model`): XLA's predicted peak per device
  (`compile_ahead`) against the peak the allocator measured over `steps`
  steps (`peak_bytes_in_use`; None where the backend keeps no statistics,
  as on the CPU). Run it first in its process: the measured peak is the
  process's."""
  shape = SHAPES[shape_name]
  mesh = parallel.make_mesh()
  rows = rows or shape["rows"]
  host = synthetic_batch(rows * mesh.devices.size, shape["image_size"], shape["teacher"])
  run = compile_step(3, shape, mesh, host, overrides=overrides)
  _run_steps(run, steps)
  stats = jax.local_devices()[0].memory_stats() or {}
  return {"rows": rows, "devices": mesh.devices.size, "model": overrides or {},
          "predicted_peak_bytes": run[4].get("peak_bytes"),
          "measured_peak_bytes": stats.get("peak_bytes_in_use"),
          "bytes_limit": stats.get("bytes_limit")}


# MFU's two models: CLIP's towers alone, and the paper's full order-3 model.
MFU_MODELS = {"CLIP": (0, "none"), "order 3": (3, "both")}


def add_order_ratios(table) -> list[dict]:
  """Each `order r` row's time as a ratio to order 0's, next to the paper's;
  it meets the target when it is at most the paper's ratio. Without an order
  0 row (`--orders 3`) the rows have no ratios."""
  table = [dict(r) for r in table]
  rows = {r["model"]: r for r in table}
  if "order 0" not in rows:
    return table
  base = rows["order 0"]["ms"]
  for order, paper in PAPER_MS.items():
    if f"order {order}" in rows:
      row = rows[f"order {order}"]
      row.update(ratio=row["ms"] / base, paper_ratio=paper / PAPER_MS[0])
      row["met"] = row["ratio"] <= row["paper_ratio"]
  return table


def format_memory(memory: dict) -> str:
  gib = lambda n: "-" if n is None else f"{n / 2 ** 30:.2f} GiB"
  line = (f"order-3 step, {memory['rows']} rows x {memory['devices']} devices, per device: "
          f"predicted peak {gib(memory['predicted_peak_bytes'])}, measured peak "
          f"{gib(memory['measured_peak_bytes'])} (allocator limit {gib(memory['bytes_limit'])})")
  if "target" in memory:
    line += f"; predicted for {memory['target']} {gib(memory['target_peak_bytes'])}"
  return line


def format_table(table, title) -> str:
  lines = [title, f"{'model':<10}{'ms':>10}{'ratio':>7}{'paper':>7}{'target':>8}"
                  f"{'temp MiB':>10}{'TFLOP':>9}{'TFLOP/s':>9}{'MFU':>7}"]
  for r in table:
    ratio = "" if "ratio" not in r else against(r["ratio"], r.get("paper_ratio", r["ratio"]))
    paper = f"{r['paper_ratio']:.2f}" if "paper_ratio" in r else ""
    verdict = ("met" if r["met"] else "MISSED") if "met" in r else ""
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    lines.append(f"{r['model']:<10}{r['ms']:>10.2f}{ratio:>7}{paper:>7}{verdict:>8}"
                 f"{r['temp_mib']:>10.1f}{r['tflop_per_step']:>9.4f}{r['tflops']:>9.3f}{mfu:>7}")
  return "\n".join(lines)
