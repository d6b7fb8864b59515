"""The training tests' config: the demo's model at a smaller batch, on the
corpora `tiny_corpus.corpus` writes under DIR (`tests/tiny_config.py:DIR`)."""

import os
import runpy

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def get_config(arg):
  c = runpy.run_path(os.path.join(CONFIGS, "demo.py"))["get_config"]()
  c.data.path, c.data.eval_path = os.path.join(arg, "train"), os.path.join(arg, "val")
  c.data.prepare = ""
  c.data.threads = 1
  c.batch_size = 32
  c.eval_batch_size = 32
  c.epochs = 4
  c.optim.warmup_steps = 4
  c.checkpoint.every = 8
  c.log_every = 1
  c.model.dtype = "float32"     # comparisons across layouts need no bf16 rounding
  c.model.scan = True           # the trainer's default layout (the demo unrolls its shallow stacks)
  return c
