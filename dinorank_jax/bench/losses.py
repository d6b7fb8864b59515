"""Loss benchmark: fwd+bwd time and compiled temporary memory per loss.

Each case is one symmetric loss at one device's shape: `rows` local image and
text embeddings scored against the `M` gathered items of the global batch
(D = 512), through the same two similarity matrices `S` and `Sᵀ`:

* InfoNCE: `½ [CE(S) + CE(Sᵀ)]` (`contrastive.infonce_nll`);
* order R: the cross-modal rank term `½ [PL(S, Sᵀ) + PL(Sᵀ, S)]`
  (`ranking.mutual_rank_term`); the in-modal term costs the same again;
* sort floor: only the two reference sorts and the gathers into reference
  order, the part of order 1 that any sort-based ListMLE pays.

Gradients flow to the embeddings, the gathered items and the heads.

    python -m dinorank_jax.bench.losses                       # CPU sizes
    python -m dinorank_jax.bench.losses --sizes 512x4096 --json out.json

Memory is XLA's compiled temporary allocation
(`jit(...).lower(...).compile().memory_analysis()`), per device.
"""

import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dinorank_jax import errors
from dinorank_jax.bench import against
from dinorank_jax.losses.contrastive import infonce_nll
from dinorank_jax.losses.plackett_luce import reference_order
from dinorank_jax.losses.ranking import mutual_rank_term
from dinorank_jax.models.rank_head import HighOrderPL

EMBED_DIM = 512
GIB = 2 ** 30
# (label, order, high_order_len); order None is InfoNCE, "sort" the sort floor.
CASES = (("InfoNCE", None, None), ("sort floor", "sort", None), ("order 1", 1, None),
         ("order 2, H=128", 2, 128), ("order 3, H=128", 3, 128), ("order 3 exact", 3, None))


def make_loss(order, high_order_len, chunk_size):
  """`(init(key, u, v, u_items, v_items), loss(params, u, v, u_items, v_items))`."""
  def similarities(u, v, u_items, v_items):
    return 20.0 * u @ v_items.T, 20.0 * v @ u_items.T                  # rows of S, Sᵀ

  if order is None:
    def loss(params, *embeddings):
      del params
      s, s_t = similarities(*embeddings)
      targets = jnp.arange(s.shape[0])      # row i's partner is item i
      return jnp.mean(0.5 * (infonce_nll(s, targets) + infonce_nll(s_t, targets)))
    return (lambda *_: {}), loss

  if order == "sort":
    def loss(params, *embeddings):
      del params
      s, s_t = similarities(*embeddings)
      gathered = [jnp.take_along_axis(a, reference_order(b), axis=1) for a, b in ((s, s_t), (s_t, s))]
      return jnp.mean(gathered[0] * gathered[1])
    return (lambda *_: {}), loss

  head = HighOrderPL(order=order, chunk_size=chunk_size)

  def init(key, u, v, u_items, v_items):
    s, _ = similarities(u, v, u_items, v_items)
    k1, k2 = jax.random.split(key)
    return {"image": head.init(k1, s, s, u_items), "text": head.init(k2, s, s, v_items)}

  def loss(params, u, v, u_items, v_items):
    s, s_t = similarities(u, v, u_items, v_items)
    return jnp.mean(mutual_rank_term(
        functools.partial(head.apply, params["text"]), s, v_items,
        functools.partial(head.apply, params["image"]), s_t, u_items,
        high_order_len=high_order_len))
  return init, loss


def _embeddings(rows, m, key):
  """Local rows `[rows, D]` (image, text) and the gathered items `[M, D]`."""
  k = jax.random.split(key, 3)
  normalise = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
  u_items = normalise(jax.random.normal(k[0], (m, EMBED_DIM)))
  v_items = normalise(u_items + jax.random.normal(k[1], (m, EMBED_DIM)) / EMBED_DIM ** 0.5)
  return u_items[:rows], v_items[:rows], u_items, v_items


def measure(label, order, high_order_len, rows, m, *, chunk_size=16, repeats=5,
            time_it=True):
  """One row of the table: fwd+bwd median milliseconds and temp GiB."""
  init, loss = make_loss(order, high_order_len, chunk_size)
  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
  shapes = jax.eval_shape(lambda: _embeddings(rows, m, jax.random.key(0)))
  params = jax.eval_shape(init, jax.random.key(1), *shapes)
  compiled = grad_fn.lower(params, *shapes).compile()
  result = {"loss": label, "rows": rows, "M": m,
            "temp_gib": compiled.memory_analysis().temp_size_in_bytes / GIB, "ms": None}
  if time_it:
    embeddings = _embeddings(rows, m, jax.random.key(0))
    params = init(jax.random.key(1), *embeddings)
    jax.block_until_ready(compiled(params, *embeddings))           # warm-up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, *embeddings))
      times.append(1e3 * (time.perf_counter() - start))
    result["ms"] = statistics.median(times)
  return result


def run(sizes, *, memory_size=(512, 4096), exact_limit=2 ** 26, repeats=5, chunk_size=16):
  """Measures every case at every size; the exact order-3 loss is timed only
  where `rows · M²` ≤ `exact_limit`. Returns `(table rows, target rows)`."""
  table = []
  for rows, m in sizes:
    for label, order, h in CASES:
      timed = h is not None or order != 3 or rows * m * m <= exact_limit
      table.append(measure(label, order, h, rows, m, chunk_size=chunk_size,
                           repeats=repeats, time_it=timed))
  rows, m = memory_size
  exact = measure("order 3 exact", 3, None, rows, m, chunk_size=chunk_size, time_it=False)
  targets = [{"target": f"order 3 exact at rows={rows}, M={m}: temp < 2 GiB",
              "measured": f"{exact['temp_gib']:.2f} GiB", "met": exact["temp_gib"] < 2}]
  for rows, m in sizes:
    ms = {r["loss"]: r["ms"] for r in table if (r["rows"], r["M"]) == (rows, m)}
    for num, den, bound in (("order 1", "InfoNCE", 2), ("order 3, H=128", "order 1", 3)):
      ratio = ms[num] / ms[den]
      targets.append({"target": f"{num} < {bound}x {den} at rows={rows}, M={m}",
                      "measured": f"{against(ratio, bound)}x", "met": ratio < bound})
  return table, targets


def fitted_exponent(xs, ys) -> float:
  """The least-squares slope of log y on log x: y ∝ x^slope."""
  x, y = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
  return float(np.polyfit(x, y, 1)[0])


def scaling(*, rows=32, lengths=(128, 256, 512, 1024), memory_lengths=(2048, 4096),
            row_counts=(16, 32, 64, 128), length=256, chunk_size=16, repeats=3) -> dict:
  """The exact order-3 loss as the list grows: time and temporaries against
  `M` at fixed `rows` (memory alone at `memory_lengths` too), and against
  `rows` at fixed `length`, each with the fitted exponent. Target: memory
  linear in M (exponent ≤ 1.1)."""
  exact = functools.partial(measure, "order 3 exact", 3, None, chunk_size=chunk_size,
                            repeats=repeats)
  by_m = [exact(rows, m) for m in lengths] + [exact(rows, m, time_it=False)
                                              for m in memory_lengths]
  by_rows = [exact(n, length) for n in row_counts]
  timed = [r for r in by_m if r["ms"] is not None]
  result = {
      "by_M": by_m, "by_rows": by_rows,
      "time_exponent_M": fitted_exponent([r["M"] for r in timed], [r["ms"] for r in timed]),
      "memory_exponent_M": fitted_exponent([r["M"] for r in by_m], [r["temp_gib"] for r in by_m]),
      "time_exponent_rows": fitted_exponent(row_counts, [r["ms"] for r in by_rows]),
      "memory_exponent_rows": fitted_exponent(row_counts, [r["temp_gib"] for r in by_rows]),
  }
  result["met"] = result["memory_exponent_M"] <= 1.1
  return result


def format_scaling(result) -> str:
  lines = ["exact order-3 loss (fwd+bwd) as the list grows",
           f"{'rows':>6}{'M':>7}{'ms':>10}{'temp MiB':>10}"]
  for r in result["by_M"] + result["by_rows"]:
    ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
    lines.append(f"{r['rows']:>6}{r['M']:>7}{ms:>10}{r['temp_gib'] * 1024:>10.1f}")
  lines.append(f"fitted exponents: time ~ M^{result['time_exponent_M']:.2f}, "
               f"memory ~ M^{result['memory_exponent_M']:.2f}, "
               f"time ~ rows^{result['time_exponent_rows']:.2f}, "
               f"memory ~ rows^{result['memory_exponent_rows']:.2f}")
  lines.append(f"[{'met' if result['met'] else 'MISSED'}] memory linear in M "
               f"(exponent <= 1.1): {result['memory_exponent_M']:.2f}")
  return "\n".join(lines)


def format_table(table, targets) -> str:
  base = {(r["rows"], r["M"]): r["ms"] for r in table if r["loss"] == "InfoNCE"}
  lines = [f"{'loss':<16}{'rows':>6}{'M':>7}{'fwd+bwd ms':>12}{'x InfoNCE':>11}{'temp MiB':>10}"]
  for r in table:
    ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
    ratio = "-" if r["ms"] is None else f"{r['ms'] / base[(r['rows'], r['M'])]:.2f}"
    lines.append(f"{r['loss']:<16}{r['rows']:>6}{r['M']:>7}{ms:>12}{ratio:>11}"
                 f"{r['temp_gib'] * 1024:>10.1f}")
  lines.append("")
  for t in targets:
    lines.append(f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']}")
  return "\n".join(lines)


def _size(text):
  rows, m = text.lower().split("x")
  return int(rows), int(m)


@errors.guard
def main(argv=None):
  parser = errors.ArgumentParser(prog="python -m dinorank_jax.bench.losses",
                                 description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="64x512,128x1024,256x2048",
                      help="comma-separated ROWSxM list shapes to time")
  parser.add_argument("--memory_size", default="512x4096", type=_size,
                      help="ROWSxM at which the exact order-3 memory target is checked")
  parser.add_argument("--exact_limit", default=2 ** 26, type=int,
                      help="time the exact order-3 loss only where rows*M*M <= this")
  parser.add_argument("--repeats", default=5, type=int, help="timed calls per size")
  parser.add_argument("--chunk_size", default=16, type=int, help="rank chunk size")
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args(argv)
  sizes = [_size(s) for s in args.sizes.split(",")]
  print(f"devices: {jax.devices()[0].device_kind} x{jax.device_count()}, backend {jax.default_backend()}")
  table, targets = run(sizes, memory_size=args.memory_size, exact_limit=args.exact_limit,
                       repeats=args.repeats, chunk_size=args.chunk_size)
  print(format_table(table, targets))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"backend": jax.default_backend(), "table": table, "targets": targets}, f, indent=1)


if __name__ == "__main__":
  main()
