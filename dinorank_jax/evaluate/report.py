"""The report of an evaluation: `results.json` (every number), `report.md`
(tables laid out like the paper's Tables 1–3, then every suite that ran:
its examples, skipped examples, compute dtype, each metric group with the
chance level beside it, and the retrieval tie rule) and PNG figures, all drawn from the JSON alone so that
`--compare` can put earlier evaluations side by side without a model.

Across two rank orders or more, `order_table` adds the paper's Table 5
layout (accuracy and, for the models of a sweep, training cost by order).
Figures: `order_sweep.png` (zero-shot top-1 and, for a sweep, step time
against the rank order R, drawn when the models span two orders or more;
the report says so otherwise),
`modality_gap.png` (both clouds on their first two principal axes, one panel
per model), `fidelity.png` (the teacher–student Gram cosine histogram of
each model) and `gram.png` (teacher and student Gram matrices of the first
held-out images, on one colour scale with its bar). `clip_benchmark/` holds the zero-shot and
retrieval numbers again as CLIP_benchmark's JSON records
(`evaluate.clip_benchmark`).
"""

import json
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from dinorank_jax.evaluate import clip_benchmark, order_table  # pylint: disable=wrong-import-position

RESULTS = "results.json"
# (column, suite, metric) per paper table; values are shown in percent.
TABLES = {
    "Table 1 — zero-shot ImageNet-1k (top-k) and MSCOCO 5k retrieval": [
        ("T@1", "imagenet", "zero_shot/label/top1"), ("T@3", "imagenet", "zero_shot/label/top3"),
        ("T@5", "imagenet", "zero_shot/label/top5"),
        *((f"i→t R@{k}", "coco", f"retrieval/i2t_r{k}") for k in (1, 5, 10)),
        *((f"t→i R@{k}", "coco", f"retrieval/t2i_r{k}") for k in (1, 5, 10))],
    "Table 2 — distribution shift (zero-shot top-1) and fine-grained probe (linear, top-1)": [
        ("V2-M", "imagenet_v2_mf", "zero_shot/label/top1"),
        ("V2-T", "imagenet_v2_t", "zero_shot/label/top1"),
        ("V2-Top", "imagenet_v2_top", "zero_shot/label/top1"),
        ("InR", "imagenet_r", "zero_shot/label/top1"),
        *((c, f"probe:{n}", "probe/label/top1") for c, n in
          (("FGVC", "fgvc_aircraft"), ("DTD", "dtd"), ("CUB", "cub"), ("Cars", "cars"),
           ("Flow.", "flowers"))), ("FG-avg", None, None)],
    "Table 3a — linear probes (top-1)": [
        *((c, f"probe:{n}", "probe/label/top1") for c, n in
          (("C10", "cifar10"), ("C100", "cifar100"), ("DTD", "dtd"), ("FGVC", "fgvc_aircraft"),
           ("Food", "food101"), ("GTSRB", "gtsrb"), ("Pets", "pets"), ("SST2", "sst2"),
           ("STL10", "stl10"), ("SVHN", "svhn"))), ("Avg", None, None)],
}


def _cell(value) -> str:
  return "–" if value is None else f"{100 * value:.2f}"


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
  return [f"## {title}", "", "| " + " | ".join(header) + " |",
          "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows), ""]


def _metric(model: dict, suite: str, metric: str):
  result = model["suites"].get(suite, {})
  return result.get("metrics", {}).get(metric)


def _paper_tables(models: dict) -> list[str]:
  lines = []
  for title, columns in TABLES.items():
    rows, any_value = [], False
    for name, model in models.items():
      values = [_metric(model, s, m) if s else None for _, s, m in columns]
      measured = [v for v in values if v is not None]
      any_value |= bool(measured)
      if columns[-1][1] is None and len(measured) == len(columns) - 1:   # the average column
        values[-1] = float(np.mean(measured))
      rows.append([name, *map(_cell, values)])
    if any_value:
      lines += _table(title, ["Method", *(c for c, _, _ in columns)], rows)
  return lines


def _order_table(models: dict) -> list[str]:
  """The paper's Table 5 layout (`order_table`), across two rank orders or more."""
  found = order_table.table(models)
  if found is None:
    return []
  header, rows, notes = found
  return [*_table(order_table.TITLE, header, rows), *notes, *([""] if notes else [])]


GROUPS = ("zero_shot", "retrieval", "probe", "gap", "fidelity")


def _suite_tables(models: dict) -> list[str]:
  """Every suite that ran: what it read (examples, skipped, dtype) and each
  group of its metrics, one row per model and a last row of chance levels."""
  lines = []
  suites = list(dict.fromkeys(s for m in models.values() for s, r in m["suites"].items()
                              if r.get("status") == "ok"))
  for suite in suites:
    ran = {name: m["suites"][suite] for name, m in models.items()
           if m["suites"].get(suite, {}).get("status") == "ok"}
    lines += [f"## {suite}", "", *(
        f"- {name}: {r['source']}; {r['examples']} examples, {r['skipped']} skipped; computed "
        f"in {r.get('dtype', 'an unrecorded dtype')}" for name, r in ran.items())]
    ties = next((r["ties"] for r in ran.values() if "ties" in r), None)
    lines += [f"- retrieval ties: {ties}" if ties else "", ""]
    for group in GROUPS:
      keys = list(dict.fromkeys(k for r in ran.values() for k in r["metrics"]
                                if k.startswith(group + "/")
                                and not k.endswith(("/l2", "/val_top1", "/iterations"))))
      if not keys:
        continue
      percent = group in ("zero_shot", "retrieval", "probe")
      cell = lambda v: "–" if v is None else (f"{100 * v:.2f}" if percent else f"{v:.4f}")
      rows = [[name, *(cell(r["metrics"].get(k)) for k in keys)] for name, r in ran.items()]
      chance = {k: v for r in ran.values() for k, v in r.get("chance", {}).items()}
      if any(k in chance for k in keys):
        rows.append(["chance", *(cell(chance.get(k)) for k in keys)])
      unit = " (%)" if percent else ""
      lines += _table(f"{suite}: {group}{unit}", ["Method", *(k[len(group) + 1:] for k in keys)],
                      rows)
  return lines


def markdown(results: dict) -> str:
  models = results["models"]
  lines = ["# Evaluation", ""]
  for name, m in models.items():
    source = m.get("model", {}).get("source", {})
    origin = (f"imported from {source['checkpoint']}" if "checkpoint" in source   # convert
              else f"step {source.get('step', '?')}, rank order {source.get('rank_order', '?')}")
    lines.append(f"- **{name}**: {m.get('path', '')} ({origin})")
  lines += ["", *_paper_tables(models), *_order_table(models), *_suite_tables(models)]
  skipped = [f"- {name} / {suite}: {r['status']}" for name, m in models.items()
             for suite, r in m["suites"].items() if r.get("status") != "ok"]
  if skipped:
    lines += ["## Not measured", "", *skipped, ""]
  figures = results.get("figures", [])
  orders = sorted({order_table.order(m) for m in models.values()} - {None})
  if len(orders) == 1 and "order_sweep.png" not in figures:
    figures_note = [f"The order sweep needs models of two rank orders or more; these are all "
                    f"R = {orders[0]} (`--compare` reports of other orders to draw it).", ""]
  else:
    figures_note = []
  if figures or figures_note:
    lines += ["## Figures", "", *figures_note, *(f"![{f}]({f})" for f in figures), ""]
  return "\n".join(lines)


def _plots(models: dict, key: str) -> dict:
  """`{model: plot data}` for the first suite of each model that has plot `key`."""
  out = {}
  for name, m in models.items():
    for result in m["suites"].values():
      if key in result.get("plots", {}):
        out[name] = result["plots"][key]
        break
  return out


def _save(fig, path: str) -> bool:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _one_axes(path: str, draw, xlabel: str, ylabel: str) -> bool:
  """A one-panel figure with a legend: `draw(ax)` plots the series."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  draw(ax)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7)
  return _save(fig, path)


def _gap_picture(models: dict, path: str) -> bool:
  plots = _plots(models, "gap")
  if not plots:
    return False
  fig, axes = plt.subplots(1, len(plots), figsize=(max(5, 4 * len(plots)), 4.5), squeeze=False)
  for ax, (name, p) in zip(axes[0], plots.items()):
    image, text = np.asarray(p["image"]), np.asarray(p["text"])
    # Hollow markers in two colours: where the clouds overlap, both stay visible.
    ax.scatter(*image.T, s=10, marker="o", facecolors="none", edgecolors="tab:blue",
               linewidths=0.5, alpha=0.6, label=f"image ({len(image)})")
    ax.scatter(*text.T, s=10, marker="^", facecolors="none", edgecolors="tab:orange",
               linewidths=0.5, alpha=0.6, label=f"text ({len(text)})")
    ax.scatter(*image.mean(0), marker="X", s=80, c="tab:blue", edgecolors="k", label="image mean")
    ax.scatter(*text.mean(0), marker="P", s=80, c="tab:orange", edgecolors="k", label="text mean")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("principal axis 1 (unit-norm embeddings)", fontsize=8)
    ax.set_ylabel("principal axis 2", fontsize=8)
    ax.set_aspect("equal", "datalim")
  axes[0][0].legend(fontsize=7)
  fig.suptitle("modality gap: both clouds on their first two principal axes", fontsize=9)
  return _save(fig, path)


def _fidelity(models: dict, path: str) -> bool:
  plots = _plots(models, "fidelity")
  if not plots:
    return False

  def draw(ax):
    for name, p in plots.items():
      counts = np.asarray(p["counts"], float)
      ax.stairs(counts / counts.sum(), p["bins"], label=name)

  return _one_axes(path, draw, "teacher–student Gram cosine (per held-out image)",
                   "fraction of images")


def _grams(models: dict, path: str) -> bool:
  plots = _plots(models, "fidelity")
  if not plots:
    return False
  teacher = np.asarray(next(iter(plots.values()))["teacher_gram"])
  rows = [("teacher", teacher), *((n, np.asarray(p["student_gram"])) for n, p in plots.items())]
  values = np.concatenate([np.ravel(g) for _, grams in rows for g in grams])
  fig, axes = plt.subplots(len(rows), len(teacher),
                           figsize=(2.2 * len(teacher) + 1, 2.2 * len(rows)), squeeze=False)
  for r, (name, grams) in enumerate(rows):
    for c, gram in enumerate(grams):
      shown = axes[r][c].imshow(gram, cmap="viridis", vmin=min(values.min(), 0.0),
                                 vmax=values.max())
      axes[r][c].set_xticks([])
      axes[r][c].set_yticks([])
      if r == 0:
        axes[r][c].set_title(f"image {c + 1}", fontsize=8)
    axes[r][0].set_ylabel(name, fontsize=8)
  fig.suptitle("patch Gram matrices of held-out images (patch × patch)", fontsize=9)
  fig.tight_layout()
  fig.colorbar(shown, ax=axes, shrink=0.8, label="patch cosines, each row scaled to unit norm")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


FIGURES = {"order_sweep.png": order_table.figure, "modality_gap.png": _gap_picture,
           "fidelity.png": _fidelity, "gram.png": _grams}


def write(results: dict, out: str) -> dict:
  """Writes the JSON, the figures and the Markdown to `out`; returns the results."""
  os.makedirs(out, exist_ok=True)
  results = {**results, "figures": [f for f, draw in FIGURES.items()
                                    if draw(results["models"], os.path.join(out, f))],
             "clip_benchmark": clip_benchmark.write(results, out)}
  with open(os.path.join(out, RESULTS), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(markdown(results))
  return results


def merge(directories: list[str]) -> dict:
  """The models of several earlier evaluations (their `results.json`), side by side."""
  models = {}
  for directory in directories:
    try:
      with open(os.path.join(directory, RESULTS)) as f:
        found = json.load(f)["models"]
    except FileNotFoundError:
      raise SystemExit(f"error: no {RESULTS} in {directory}: evaluate the model there first "
                       "(python -m dinorank_jax.evaluate --model EXPORT --out DIR)") from None
    for name, m in found.items():
      key, n = name, 2
      while key in models:
        key, n = f"{name} ({n})", n + 1
      models[key] = m
  return {"models": models}
