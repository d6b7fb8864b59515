"""The training tests' config: the demo's model at a smaller batch, on the
corpora `tiny_corpus.corpus` writes under DIR (`tests/tiny_config.py:DIR`).

The tests of a run's mechanics (resume after a kill or a signal, a lost
process, damaged checkpoints, skipped records, the non-finite guard,
restarts on another process count, the step read from the cache) train it
without its students (`lean_config`): what they check — checkpoints, data
positions, collectives across processes, which program is compiled — does
not depend on the model's parts. Without them the order-3 step has 4,533
equations instead of 9,580 and compiles in a third of the time
(docs/performance.md § The test suite's time). The full model trains in
the loop, export, warm-start and evaluation tests, and every term's
reduction over devices is the data-parallel step test's (test_step.py).
"""

import os
import runpy

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


LEAN_FLAGS = ("--config.model.students=none",)     # `lean_config` on the command line


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


def lean_config(arg):
  """`get_config(arg)` without the students (`LEAN_FLAGS`)."""
  c = get_config(arg)
  c.model.students = "none"
  return c



