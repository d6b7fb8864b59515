"""Scalar metrics to TensorBoard event files and a JSONL file in the workdir.

Event files are written with the `tensorboard` package's own writer (no
TensorFlow, and unlike tensorboardX no torch import).

Only the lead process writes; the others hold a writer that does nothing,
so callers need no `if jax.process_index() == 0`. Each JSONL line is
`{"step": s, "name": value, ...}`, one line per `write` call.

With `wandb` (a dict of `wandb.init` arguments: `config.log.wandb` on), the
same scalars also go to Weights & Biases; `wandb` is imported only then (the
`wandb` extra). The run id is derived from the workdir, so a resumed run
continues the same W&B run; `WANDB_MODE=offline` keeps it on disk under
`workdir/wandb/`.
"""

import hashlib
import json
import os
import time

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

METRICS = "metrics.jsonl"


class MetricWriter:

  def __init__(self, workdir: str, *, active: bool = True, wandb: dict | None = None):
    self.active, self.wandb = active, None
    if active:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, METRICS), "a")
      self.tensorboard = EventFileWriter(os.path.join(workdir, "tensorboard"))
      if wandb is not None:
        self.wandb = _wandb_run(workdir, wandb)

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v)
                                         for k, v in values.items()])
    self.tensorboard.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary))
    self.jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self.jsonl.flush()
    if self.wandb is not None:
      self.wandb.log(values, step=int(step))

  def close(self) -> None:
    if self.active:
      self.tensorboard.close()
      self.jsonl.close()
      if self.wandb is not None:
        self.wandb.finish()


def read(workdir: str) -> list[dict]:
  """The rows of a run's `metrics.jsonl`, in the order written."""
  with open(os.path.join(workdir, METRICS)) as f:
    return [json.loads(line) for line in f]


def _wandb_run(workdir: str, arguments: dict):
  import wandb  # pylint: disable=import-outside-toplevel  # config_checks.validate checked it is there
  run_id = hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:16]
  return wandb.init(dir=workdir, id=run_id, resume="allow", **arguments)
