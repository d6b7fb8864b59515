"""Scalar metrics to TensorBoard event files and a JSONL file in the workdir.

Event files are written with the `tensorboard` package's own writer (no
TensorFlow, and unlike tensorboardX no torch import).

Only the lead process writes; the others hold a writer that does nothing,
so callers need no `if jax.process_index() == 0`. Each JSONL line is
`{"step": s, "name": value, ...}`, one line per `write` call.
"""

import json
import os
import time

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:

  def __init__(self, workdir: str, *, active: bool = True):
    self.active = active
    if active:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self.tensorboard = EventFileWriter(os.path.join(workdir, "tensorboard"))

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

  def close(self) -> None:
    if self.active:
      self.tensorboard.close()
      self.jsonl.close()
