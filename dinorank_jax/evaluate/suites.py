"""The evaluation suites: what each measures and where it looks for data.

Each suite returns `{"status": "ok" | "skipped: …", "source": …,
"metrics": {name: float}, "plots": {…}}`; a dataset that is missing is
reported as skipped with the places it was looked for, never faked. Datasets
are looked for under `--data_dir` first as a prepared tensorflow-datasets
name (`sources.tfds_split`), then as an image folder (`sources.folder_split`).

    imagenet, imagenet_v2, imagenet_r   zero-shot top-1/3/5 and mean per-class
                                        recall, CLIP's 80 prompt templates
    coco                                MSCOCO 5k Karpathy test retrieval, R@1/5/10
    gap                                 modality gap on MSCOCO 5k Karpathy val
    probes, fine_grained                linear probes of Table 3a (ten datasets)
                                        and of the fine-grained probe (five)
    synthetic                           the demo corpus (`DATA_DIR/train`,
                                        `DATA_DIR/val`): zero-shot per task,
                                        retrieval, a probe per task, the gap
                                        and distillation fidelity
    records:DIR                         the same on any records directory, without probes
    folder:DIR                          zero-shot on any image folder `DIR/<class>/…`
    wds:DIR                             a CLIP_benchmark webdataset's test split:
                                        zero-shot (its own templates when it has
                                        them) or, for a retrieval set, R@1/5/10
    probe:NAME                          a linear probe on any dataset under DATA_DIR
    table1, table2, table3, all         groups of the above
"""

import dataclasses
import os
import sys

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dinorank_jax.losses.distill import align_teacher_grid
from dinorank_jax.evaluate import metrics, probe
from dinorank_jax.evaluate.prompts import SYNTHETIC_TEMPLATES, class_embeddings, imagenet_templates
from dinorank_jax.evaluate.sources import (Damaged, NotFound, folder_split, records_split,
                                           tfds_split, wds_split)

PROBE_LIMIT = 50_000          # training examples a probe embeds at most
VAL_FRACTION = 0.2            # of the training split, when a dataset has no validation split
GAP_POINTS = 1000             # pairs drawn in the gap picture
GRAM_IMAGES = 3               # images whose Gram matrices are drawn
COSINE_BINS = np.linspace(-1.0, 1.0, 41)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset under DATA_DIR: a prepared tensorflow-datasets name with its
  split names, and an image folder. A zero-shot set's folder holds the
  labelled images; a probe's holds `train/`, `test/` and optionally `val/`."""
  tfds: str | None
  folder: str | None
  train: str = "train"
  val: str | None = None
  test: str = "test"
  folder_splits: bool = True
  present_only: bool = False      # zero-shot among the classes that occur only

  def folder_path(self, data_dir: str, split: str) -> str:
    return os.path.join(data_dir, self.folder, *([split] if self.folder_splits else []))


ZERO_SHOT = {   # folders of WordNet-id class directories (ImageNet's and ImageNet-R's releases)
    "imagenet": Dataset("imagenet2012", "imagenet/val", test="validation", folder_splits=False),
    "imagenet_v2_mf": Dataset("imagenet_v2/matched-frequency", None),
    "imagenet_v2_t": Dataset("imagenet_v2/threshold-0.7", None),
    "imagenet_v2_top": Dataset("imagenet_v2/topimages", None),
    "imagenet_r": Dataset("imagenet_r", "imagenet-r", folder_splits=False, present_only=True),
}
COCO = Dataset("coco_captions", None, val="val", test="test")
PROBES = {
    "cifar10": Dataset("cifar10", "cifar10"),
    "cifar100": Dataset("cifar100", "cifar100"),
    "dtd": Dataset("dtd", "dtd", val="validation"),
    "fgvc_aircraft": Dataset(None, "fgvc_aircraft"),
    "food101": Dataset("food101", "food101", test="validation"),
    "gtsrb": Dataset(None, "gtsrb"),
    "pets": Dataset("oxford_iiit_pet", "pets"),
    "sst2": Dataset(None, "rendered_sst2"),
    "stl10": Dataset("stl10", "stl10"),
    "svhn": Dataset("svhn_cropped", "svhn"),
    "cub": Dataset("caltech_birds2011", "cub"),
    "cars": Dataset("cars196", "cars"),
    "flowers": Dataset("oxford_flowers102", "flowers", val="validation"),
}
TABLE3A = ("cifar10", "cifar100", "dtd", "fgvc_aircraft", "food101", "gtsrb", "pets", "sst2",
           "stl10", "svhn")
FINE_GRAINED = ("fgvc_aircraft", "dtd", "cub", "cars", "flowers")
GROUPS = {
    "imagenet_v2": ("imagenet_v2_mf", "imagenet_v2_t", "imagenet_v2_top"),
    "probes": tuple(f"probe:{n}" for n in TABLE3A),
    "fine_grained": tuple(f"probe:{n}" for n in FINE_GRAINED),
    "table1": ("imagenet", "coco"),
    "table2": ("imagenet_v2_mf", "imagenet_v2_t", "imagenet_v2_top", "imagenet_r",
               *(f"probe:{n}" for n in FINE_GRAINED)),
    "table3": tuple(f"probe:{n}" for n in TABLE3A),
}
GROUPS["all"] = ("imagenet", "coco", "gap", *GROUPS["table2"],
                 *(s for s in GROUPS["table3"] if s not in GROUPS["table2"]))


NAMED = (*ZERO_SHOT, "coco", "gap", "synthetic", *GROUPS)
PREFIXES = ("records:", "folder:", "probe:", "wds:")


def _unknown(name: str) -> ValueError:
  return ValueError(f"unknown suite {name!r}: pick from {', '.join(NAMED)}, records:DIR, "
                    "folder:DIR, wds:DIR or probe:NAME")


def expand(names: list[str]) -> list[str]:
  """Suite names with groups replaced by their members, each once, in order."""
  out = []
  for name in names:
    if name not in NAMED and not name.startswith(PREFIXES):
      raise _unknown(name)
    for s in (expand(list(GROUPS[name])) if name in GROUPS else [name]):
      if s not in out:
        out.append(s)
  return out


def find(dataset: Dataset, data_dir: str, split: str):
  """The split of `dataset` under `data_dir`: TFDS first, then the image folder."""
  missing = []
  if dataset.tfds and getattr(dataset, split):
    try:
      return tfds_split(data_dir, dataset.tfds, getattr(dataset, split))
    except NotFound as e:
      missing.append(str(e))
  if dataset.folder:
    try:
      return folder_split(dataset.folder_path(data_dir, split))
    except NotFound as e:
      missing.append(str(e))
  raise NotFound("; ".join(missing))


def embed_split(model, split, *, limit: int | None = None, fidelity: bool = False,
                batch_size: int = 256) -> dict:
  """Image embeddings (and labels, captions, student and teacher tokens) of the
  first `limit` examples; undecodable ones are dropped and counted in `skipped`."""
  n = split.size if limit is None else min(split.size, limit)
  parts, skipped = [], 0
  for start in tqdm(range(0, n, batch_size), desc=split.name, unit="batch", file=sys.stderr,
                    leave=False):
    batch = split.read(np.arange(start, min(start + batch_size, n)), model.image_size)
    valid = batch["valid"]
    if not valid.any():
      skipped += len(valid)
      continue
    part = {"image": model.encode_image(batch["image"][valid]),
            "labels": {t: y[valid] for t, y in batch.get("labels", {}).items()}}
    if "captions" in batch:
      part["captions"] = [c for c, ok in zip(batch["captions"], valid) if ok]
    if fidelity and "teacher_patches" in batch:
      student = model.image_student_tokens(batch["image"][valid])
      side = int(round(np.sqrt(student.shape[1])))
      part["student"] = student
      part["teacher"] = np.asarray(align_teacher_grid(
          jnp.asarray(batch["teacher_patches"][valid]), jnp.asarray(batch["crop"][valid]),
          jnp.asarray(batch["flip"][valid]), (side, side)))
    parts.append(part)
    skipped += int(len(valid) - valid.sum())
  if not parts:
    raise NotFound(f"{split.name}: no decodable example among the first {n}")
  out = {"image": np.concatenate([p["image"] for p in parts]),
         "labels": {t: np.concatenate([p["labels"][t] for p in parts]) for t in parts[0]["labels"]},
         "skipped": skipped, "source": split.name, "tasks": split.tasks,
         "templates": split.templates}
  if "captions" in parts[0]:
    out["captions"] = [c for p in parts for c in p["captions"]]
  if "student" in parts[0]:
    out["student"] = np.concatenate([p["student"] for p in parts])
    out["teacher"] = np.concatenate([p["teacher"] for p in parts])
  return out


def zero_shot(model, embedded: dict, templates, *, present_only: bool = False) -> dict[str, float]:
  """Per task; with `present_only`, the classifier has only the classes that
  occur (ImageNet-R's 200 of ImageNet's 1,000 labels)."""
  out = {}
  for task, names in embedded["tasks"].items():
    image, labels = _labelled(embedded, task)
    if present_only:
      present = np.unique(labels)
      names, labels = [names[c] for c in present], np.searchsorted(present, labels)
    classes = class_embeddings(model.encode_text, names, templates)
    scores = metrics.zero_shot(image, classes, labels)
    out.update({f"{task}/{k}": v for k, v in scores.items()})
  return out


def _captions(model, embedded: dict):
  """Every caption's embedding and the image it describes."""
  captions = embedded["captions"]
  owner = np.asarray([i for i, c in enumerate(captions) for _ in c], np.int64)
  return model.encode_text([t for c in captions for t in c]), owner


def retrieval(model, embedded: dict) -> dict[str, float]:
  text, owner = _captions(model, embedded)
  return metrics.retrieval(embedded["image"], text, owner)


def gap(model, embedded: dict, seed: int = 0) -> tuple[dict, dict]:
  """Gap numbers on (image, its first caption) pairs, and the 2-D picture's points."""
  image = embedded["image"]
  text = model.encode_text([c[0] for c in embedded["captions"]])
  found = metrics.modality_gap(image, text)        # first: it refuses unusable embeddings
  pick = np.random.default_rng(seed).permutation(len(image))[:GAP_POINTS]
  xy_image, xy_text = metrics.projection_2d(image[pick], text[pick])
  return (found,
          {"gap": {"image": np.round(xy_image, 4).tolist(), "text": np.round(xy_text, 4).tolist()}})


def fidelity(embedded: dict) -> tuple[dict, dict]:
  """Teacher–student Gram cosine and distance on the held-out images."""
  f = metrics.gram_fidelity(embedded["student"], embedded["teacher"])
  counts, _ = np.histogram(f["cosine"], COSINE_BINS)
  grams = [np.round(np.asarray(g), 4).tolist() for g in
           (metrics.gram_matrix(embedded["teacher"][:GRAM_IMAGES]),
            metrics.gram_matrix(embedded["student"][:GRAM_IMAGES]))]
  return ({"cosine_mean": float(f["cosine"].mean()),
           "cosine_above_0.9": float(np.mean(f["cosine"] > 0.9)),
           "gram_distance": float(f["distance"].mean())},
          {"fidelity": {"bins": COSINE_BINS.tolist(), "counts": counts.tolist(),
                        "teacher_gram": grams[0], "student_gram": grams[1]}})


def _probe_splits(model, splits: dict, limit: int, batch_size: int):
  """The embedded train, validation (carved from train when the dataset has
  none) and test splits of a probe."""
  train = embed_split(model, splits["train"], limit=limit, batch_size=batch_size)
  test = embed_split(model, splits["test"], batch_size=batch_size)
  if "val" not in splits:
    return (*_carve_val(train), test)
  return train, embed_split(model, splits["val"], limit=limit, batch_size=batch_size), test


def _carve_val(train: dict) -> tuple[dict, dict]:
  """A seeded `VAL_FRACTION` of the embedded training split as validation."""
  order = np.random.default_rng(0).permutation(len(train["image"]))
  cut = int(len(order) * (1 - VAL_FRACTION))
  rows = lambda idx: {**train, "image": train["image"][idx],
                      "labels": {t: y[idx] for t, y in train["labels"].items()}}
  return rows(order[:cut]), rows(order[cut:])


def _labelled(embedded: dict, task: str) -> tuple[np.ndarray, np.ndarray]:
  known = embedded["labels"][task] >= 0
  return embedded["image"][known], embedded["labels"][task][known]


def _probe_metrics(train, val, test) -> dict[str, float]:
  out = {}
  for task in test["tasks"]:
    num_classes = len(test["tasks"][task])
    scores = probe.linear_probe(*(_labelled(e, task) for e in (train, val, test)), num_classes)
    out.update({f"{task}/{k}": v for k, v in scores.items()})
  return out


def _records_metrics(model, split, batch_size: int) -> tuple[dict, dict, dict]:
  held_out = embed_split(model, split, fidelity=model.has_image_student, batch_size=batch_size)
  gap_metrics, plots = gap(model, held_out)
  found = {**_prefixed("zero_shot", zero_shot(model, held_out, SYNTHETIC_TEMPLATES)),
           **_prefixed("retrieval", retrieval(model, held_out)), **_prefixed("gap", gap_metrics)}
  if "student" in held_out:
    fidelity_metrics, fidelity_plots = fidelity(held_out)
    found, plots = {**found, **_prefixed("fidelity", fidelity_metrics)}, {**plots, **fidelity_plots}
  return found, plots, held_out


def locate(name: str, data_dir: str) -> dict:
  """The splits suite `name` reads, by role (`test`, and `train` and `val`
  where it has them), found under `data_dir` or its DIR; raises `NotFound`
  or `Damaged` when they are not there. Cheap: nothing is decoded."""
  if name in ZERO_SHOT:
    return {"test": find(ZERO_SHOT[name], data_dir, "test")}
  if name.startswith("folder:"):
    return {"test": folder_split(_directory(name))}
  if name.startswith("wds:"):
    return {"test": wds_split(_directory(name))}
  if name == "coco":
    return {"test": find(COCO, data_dir, "test")}
  if name == "gap":
    return {"test": find(COCO, data_dir, "val")}
  if name.startswith("probe:"):
    key = name[len("probe:"):]
    dataset = PROBES.get(key, Dataset(key, key))
    splits = {"train": find(dataset, data_dir, "train"), "test": find(dataset, data_dir, "test")}
    try:
      splits["val"] = find(dataset, data_dir, "val")
    except NotFound:
      pass
    return splits
  if name.startswith("records:"):
    return {"test": records_split(_directory(name))}
  if name == "synthetic":
    return {"test": records_split(os.path.join(data_dir, "val")),
            "train": records_split(os.path.join(data_dir, "train"))}
  raise _unknown(name)


def missing(name: str, data_dir: str) -> str | None:
  """Why suite `name` cannot run (its `run` status), or None when its data is there."""
  try:
    locate(name, data_dir)
  except (NotFound, Damaged) as e:
    return _skipped(e)
  return None


def _skipped(e: Exception) -> str:
  """The status of a suite whose data is missing (`NotFound`) or damaged."""
  return f"skipped: not found at {e}" if isinstance(e, NotFound) else f"skipped: damaged: {e}"


def run(name: str, model, data_dir: str, *, batch_size: int = 256,
        probe_limit: int = PROBE_LIMIT) -> dict:
  """One suite on one model: the result dict of the module docstring."""
  try:
    splits = locate(name, data_dir)
    test = splits["test"]
    if name in ZERO_SHOT or name.startswith("folder:") or name.startswith("wds:"):
      embedded = embed_split(model, test, batch_size=batch_size)
      if "captions" in embedded:              # a CLIP_benchmark retrieval set
        return _ok(embedded, _prefixed("retrieval", retrieval(model, embedded)))
      present_only = name in ZERO_SHOT and ZERO_SHOT[name].present_only
      templates = embedded["templates"] or imagenet_templates()
      return _ok(embedded, _prefixed("zero_shot", zero_shot(
          model, embedded, templates, present_only=present_only)), present_only=present_only)
    if name == "coco":
      embedded = embed_split(model, test, batch_size=batch_size)
      return _ok(embedded, _prefixed("retrieval", retrieval(model, embedded)))
    if name == "gap":
      embedded = embed_split(model, test, batch_size=batch_size)
      found, plots = gap(model, embedded)
      return _ok(embedded, _prefixed("gap", found), plots)
    if name.startswith("probe:"):
      train, val, test = _probe_splits(model, splits, probe_limit, batch_size)
      return _ok(test, _prefixed("probe", _probe_metrics(train, val, test)))
    found, plots, held_out = _records_metrics(model, test, batch_size)
    if name == "synthetic":
      train = embed_split(model, splits["train"], limit=probe_limit, batch_size=batch_size)
      probes = _probe_metrics(*_carve_val(train), held_out)
      found = {**found, **_prefixed("probe", probes)}
    return _ok(held_out, found, plots)
  except (NotFound, Damaged) as e:
    return {"status": _skipped(e)}


def _directory(name: str) -> str:
  """The DIR of `folder:DIR`, `wds:DIR` or `records:DIR`, made absolute: a
  relative DIR is read from the current directory (not --data_dir), and a
  report that it is missing says where it was looked for."""
  return os.path.abspath(name.partition(":")[2])


def _prefixed(group: str, found: dict) -> dict:
  return {f"{group}/{k}": v for k, v in found.items()}


def chance(embedded: dict, found: dict, *, present_only: bool = False) -> dict[str, float]:
  """What a random ranking scores on average, for each zero-shot, probe and
  retrieval number of `found` (a probe's top-1 and mean per-class recall:
  one over the classes)."""
  levels = {}
  for task, names in embedded["tasks"].items():
    labels = embedded["labels"][task]
    competing = len(np.unique(labels[labels >= 0])) if present_only else len(names)
    levels.update(_prefixed(f"zero_shot/{task}", metrics.zero_shot_chance(competing)))
    levels[f"probe/{task}/top1"] = levels[f"probe/{task}/mean_per_class_recall"] = 1 / len(names)
  if "captions" in embedded:
    levels.update(_prefixed("retrieval", metrics.retrieval_chance(
        [len(c) for c in embedded["captions"]])))
  return {k: v for k, v in levels.items() if k in found}


def _ok(embedded: dict, found: dict, plots: dict | None = None, *,
        present_only: bool = False) -> dict:
  out = {"status": "ok", "source": embedded["source"], "examples": int(len(embedded["image"])),
         "skipped": int(embedded["skipped"]), "metrics": found,
         "chance": chance(embedded, found, present_only=present_only), "plots": plots or {}}
  if any(k.startswith("retrieval/") for k in found):
    out["ties"] = metrics.TIES
  return out
