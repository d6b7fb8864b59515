"""The order sweep in the paper's Table 5 layout, and its figure.

One column per model, ordered by rank order; one row per zero-shot top-1
and retrieval R@1 number the models share, then the cost of training each
(`training`, which `python -m dinorank_jax.sweep` records beside a model's
evaluation): the median step time and its ratio to the lowest order's, the
rank heads' parameters, the compiled step's peak memory per device and the
training time (steps × median step time). Where the paper publishes a row
(ImageNet and ImageNet-R zero-shot top-1 on CC3M; step time on its
8 × H100 node; rank-head parameters; its 64-epoch wall-clock), that row
follows ours, marked "paper", for the same orders.
"""

import matplotlib.pyplot as plt
import numpy as np

from dinorank_jax.bench.step import PAPER_MS
from dinorank_jax.evaluate import clip_benchmark

# The paper's Table 5, by rank order.
PAPER_TOP1 = {"imagenet": {0: 9.06, 1: 10.16, 2: 10.85, 3: 11.30, 4: 11.27, 5: 11.18},
              "imagenet_r": {0: 9.36, 1: 11.34, 2: 12.40, 3: 13.50, 4: 13.47, 5: 13.20}}
PAPER_RANK_HEAD_M = {0: 0.0, 1: 0.0, 2: 0.16, 3: 0.61, 4: 1.32, 5: 2.30}
PAPER_HOURS = {0: 10.8, 1: 11.2, 2: 12.4, 3: 13.7, 4: 14.8, 5: 16.0}
ORDER_NAMES = {0: "CLIP", 1: "RankCLIP"}


def order(model: dict):
  """A model's rank order, from its export's source (None for imported models)."""
  return model.get("model", {}).get("source", {}).get("rank_order")


def swept(models: dict) -> dict:
  """The models that have a rank order, by order; `{}` unless they span two orders or more."""
  ordered = sorted(((order(m), name) for name, m in models.items() if order(m) is not None))
  if len({o for o, _ in ordered}) < 2:
    return {}
  return {name: models[name] for _, name in ordered}


def _accuracy_rows(models: dict) -> list[tuple[str, str, str]]:
  """`(label, suite, metric)` of every zero-shot top-1 and retrieval R@1 measured."""
  rows = {}
  for m in models.values():
    for suite, result in m["suites"].items():
      dataset = clip_benchmark.dataset_name(suite)
      for metric in result.get("metrics", {}):
        if metric.startswith("zero_shot/") and metric.endswith("/top1"):
          task = metric.split("/")[1]
          rows[(suite, metric)] = (f"{dataset} zero-shot top-1 (%)" if task == "label" else
                                   f"{dataset} {task} zero-shot top-1 (%)")
        elif metric in ("retrieval/i2t_r1", "retrieval/t2i_r1"):
          arrow = "i→t" if "i2t" in metric else "t→i"
          rows[(suite, metric)] = f"{dataset} {arrow} R@1 (%)"
  return [(label, suite, metric) for (suite, metric), label in rows.items()]


def _training(model: dict, key: str):
  return model.get("training", {}).get(key)


def _step_ms(model: dict):
  seconds = _training(model, "step_seconds")
  return None if seconds is None else 1000 * seconds


def _fmt(value, digits: int = 2) -> str:
  return "–" if value is None else f"{value:.{digits}f}"


TITLE = "Table 5 — the order sweep: accuracy and cost by rank order"


def table(models: dict) -> tuple[list[str], list[list[str]], list[str]] | None:
  """The table as `(header, rows, notes)`, cells formatted (`report` lays
  it out under `TITLE`); None unless the models span two orders."""
  models = swept(models)
  if not models:
    return None
  orders = [order(m) for m in models.values()]
  unique = len(set(orders)) == len(orders)
  header = [f"{o} ({ORDER_NAMES[o]})" if unique and o in ORDER_NAMES else
            (str(o) if unique else f"{name} (R={o})") for name, o in zip(models, orders)]
  rows = []
  for label, suite, metric in _accuracy_rows(models):
    values = [m["suites"].get(suite, {}).get("metrics", {}).get(metric) for m in models.values()]
    rows.append([label, *(_fmt(None if v is None else 100 * v) for v in values)])
    paper = PAPER_TOP1.get(suite) if metric == "zero_shot/label/top1" else None
    if paper:
      rows.append([f"{label}, paper (CC3M)", *(_fmt(paper.get(o)) for o in orders)])
  base = _step_ms(next(iter(models.values())))
  step_ms = [_step_ms(m) for m in models.values()]
  params = [_training(m, "rank_head_params") for m in models.values()]
  peaks = [_training(m, "peak_bytes") for m in models.values()]
  hours = [None if s is None else s * _training(m, "steps") / 3.6e6
           for s, m in zip(step_ms, models.values())]
  if any(s is not None for s in step_ms):
    rows += [["step time (ms)", *(_fmt(s, 1) for s in step_ms)],
             ["step time, paper (8 × H100)", *(_fmt(PAPER_MS.get(o), 0) for o in orders)],
             [f"step time / order {orders[0]}", *(
                 _fmt(None if s is None or not base else s / base) for s in step_ms)],
             [f"step time / order {orders[0]}, paper", *(
                 _fmt(PAPER_MS[o] / PAPER_MS[orders[0]] if o in PAPER_MS and orders[0] in
                      PAPER_MS else None) for o in orders)]]
  if any(p is not None for p in params):
    rows += [["rank-head parameters (M)", *(_fmt(None if p is None else p / 1e6, 3)
                                            for p in params)],
             ["rank-head parameters (M), paper", *(_fmt(PAPER_RANK_HEAD_M.get(o)) for o in orders)]]
  if any(p is not None for p in peaks):
    rows.append(["step's peak memory per device (GiB)", *(
        _fmt(None if p is None else p / 2 ** 30, 3) for p in peaks)])
  if any(h is not None for h in hours):
    rows += [["training time, steps × step time (h)", *(_fmt(h, 3) for h in hours)],
             ["wall-clock of 64 epochs, paper (h)", *(_fmt(PAPER_HOURS.get(o), 1) for o in orders)]]
  ran = {(_training(m, "steps"), _training(m, "batch_size"), _machine(m["training"]))
         for m in models.values() if "training" in m}
  notes = [f"Ours: {steps:,} steps of batch {batch} on {machine}; the step time is the median "
           "over the logged intervals. The paper's rows are its CC3M runs on 8 × H100."
           for steps, batch, machine in sorted(ran, key=str)]
  return ["rank order", *header], rows, notes


def _machine(training: dict) -> str:
  if "devices" not in training:
    return "unrecorded devices"
  processes = training["processes"]
  return (f"{training['devices']} {training['device_kind']} devices in {processes} "
          f"process{'es' if processes > 1 else ''}")


def figure(models: dict, path: str) -> bool:
  """Zero-shot top-1 against rank order and, where the models' training was
  timed, the step time against order as a ratio to the lowest order's, ours
  beside the paper's. Drawn only across two orders or more."""
  models = swept(models)
  if not models:
    return False
  series = {}
  for m in models.values():
    for suite, result in m["suites"].items():
      for metric, value in result.get("metrics", {}).items():
        if metric.startswith("zero_shot/") and metric.endswith("/top1"):
          label = f"{suite} {metric[len('zero_shot/'):-len('/top1')]}"
          series.setdefault(label, []).append((order(m), 100 * value))
  timed = [(order(m), _step_ms(m)) for m in models.values() if _step_ms(m) is not None]
  if not series and not timed:
    return False
  panels = [p for p in ("accuracy", "time") if (series if p == "accuracy" else timed)]
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
  orders = sorted({order(m) for m in models.values()})
  for ax, panel in zip(axes[0], panels):
    if panel == "accuracy":
      for label, points in sorted(series.items()):
        points.sort()
        ax.plot(*np.transpose(points), "o-", label=label)
      ax.set_ylabel("zero-shot top-1 (%)")
      ax.set_title("zero-shot top-1 by rank order (legend: suite and task)", fontsize=9)
    else:
      timed.sort()
      base = timed[0][1]
      ax.plot([o for o, _ in timed], [t / base for _, t in timed], "o-", label="ours")
      paper = [o for o in orders if o in PAPER_MS and timed[0][0] in PAPER_MS]
      ax.plot(paper, [PAPER_MS[o] / PAPER_MS[timed[0][0]] for o in paper], "s--",
              label="paper, 8 × H100")
      ax.set_ylabel(f"step time / order {timed[0][0]}'s")
      ax.set_title("step time by rank order", fontsize=9)
    ax.set_xticks(orders)
    ax.set_xlabel("rank order R")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True
