"""Our results in CLIP_benchmark's terms, so they sit beside the tables people cite.

CLIP_benchmark writes one JSON per (model, dataset, task):
`{"dataset", "model", "pretrained", "task", "metrics", "language"}`, with
`acc1`, `acc5`, `mean_per_class_recall` for `zeroshot_classification` and
`image_retrieval_recall@k` (a caption retrieves its image: our `t2i_r{k}`)
and `text_retrieval_recall@k` (an image retrieves a caption: our `i2t_r{k}`)
for `zeroshot_retrieval`. Each record also names the compute `dtype` and,
for retrieval, the tie rule (`metrics.TIES`). `records(results)` turns one evaluation's
`results.json` into those records; `write` saves them as
`OUT/clip_benchmark/<model>__<dataset>__<task>.json`. Our own names stay in
`results.json` and the report (they read better beside the paper's tables);
the linear probes, the gap and the fidelity numbers have no CLIP_benchmark
counterpart and are left out.
"""

import json
import os
import re

DIRECTORY = "clip_benchmark"
_ZERO_SHOT = re.compile(r"^zero_shot/(?P<task>.+)/(?P<metric>top\d+|mean_per_class_recall)$")
_RETRIEVAL = re.compile(r"^retrieval/(?P<direction>i2t|t2i)_r(?P<k>\d+)$")


def rename(metric: str) -> tuple[str, str, str] | None:
  """Our metric name -> `(task, dataset suffix, CLIP_benchmark name)`, or None."""
  found = _ZERO_SHOT.match(metric)
  if found:
    name = found["metric"]
    name = f"acc{name[3:]}" if name.startswith("top") else name
    return "zeroshot_classification", found["task"], name
  found = _RETRIEVAL.match(metric)
  if found:
    retrieved = "text" if found["direction"] == "i2t" else "image"
    return "zeroshot_retrieval", "", f"{retrieved}_retrieval_recall@{found['k']}"
  return None


def records(results: dict) -> list[dict]:
  """CLIP_benchmark records of every evaluated suite of every model."""
  out = {}
  for model, entry in results["models"].items():
    for suite, result in entry["suites"].items():
      for metric, value in result.get("metrics", {}).items():
        renamed = rename(metric)
        if renamed is None:
          continue
        task, part, name = renamed
        dataset = _task_dataset(dataset_name(suite), part)
        key = (model, dataset, task)
        record = out.setdefault(key, {"dataset": dataset, "model": model,
                                      "pretrained": entry["path"], "task": task,
                                      "metrics": {}, "language": "en",
                                      "dtype": result.get("dtype")})
        if task == "zeroshot_retrieval":
          record["ties"] = result.get("ties")
        record["metrics"][name] = value
  return list(out.values())


def flat(suite: str, metrics: dict) -> dict[str, float]:
  """`{"<dataset>/<metric>": value}` for one suite's metrics: CLIP_benchmark's
  dataset and metric names where it has them (`imagenet/acc1`,
  `wds/vtab-cifar10/acc5`, `synthetic/colour/acc1`,
  `coco/image_retrieval_recall@5`), ours for the rest
  (`synthetic/probe/colour/top1`). The trainer logs them under `eval/`."""
  dataset, out = dataset_name(suite), {}
  for metric, value in metrics.items():
    renamed = rename(metric)
    if renamed is None:
      out[f"{dataset}/{metric}"] = value
    else:
      out[f"{_task_dataset(dataset, renamed[1])}/{renamed[2]}"] = value
  return out


def _task_dataset(dataset: str, task: str) -> str:
  """The dataset name of one zero-shot task (`synthetic/colour`); a dataset's
  only task (`label`) and retrieval keep the dataset's own."""
  return dataset if task in ("", "label") else f"{dataset}/{task}"


def dataset_name(suite: str) -> str:
  """CLIP_benchmark names its webdatasets `wds/<name>`; ours are `wds:DIR`.
  `records:DIR` and `folder:DIR` are named the same way (`records/<name>`)."""
  kind, colon, directory = suite.partition(":")
  if colon and kind in ("wds", "records", "folder"):
    return f"{kind}/{os.path.basename(os.path.normpath(directory))}"
  return suite


def write(results: dict, out: str) -> list[str]:
  """Writes `records(results)` under `out/clip_benchmark/`; returns the files."""
  directory = os.path.join(out, DIRECTORY)
  os.makedirs(directory, exist_ok=True)
  files = []
  for record in records(results):
    name = "__".join(re.sub(r"[^\w.-]+", "_", record[k]) for k in ("model", "dataset", "task"))
    path = os.path.join(directory, name + ".json")
    with open(path, "w") as f:
      json.dump(record, f, indent=1)
    files.append(os.path.relpath(path, out))
  return files
