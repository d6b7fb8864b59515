"""The demo: a tiny order-3 DinoRankCLIP on a synthetic corpus, on the CPU.

    python -m dinorank_jax.main --config configs/demo.py --workdir runs/demo

(`make demo` runs this.) Builds the synthetic train and held-out corpora with
the tiny untrained teacher's features under `data/demo/` when absent, trains
every part of the method (both students, gated fusion, order-3 rank heads
with the staged warm-start) and prints zero-shot and retrieval accuracy on
the held-out split.
"""

from ml_collections import ConfigDict

from dinorank_jax.config import paper


def get_config(arg=None):
  del arg
  c = paper(order=3, epochs=10)
  c.data.path = "data/demo/train"
  c.data.eval_path = "data/demo/val"
  c.data.prepare = "synthetic"
  c.data.synthetic = ConfigDict(dict(num_train=8192, num_eval=1024, image_size=64,
                                     teacher_size=64))
  c.data.image_size = 32
  # One thread reads, decodes and batches: a pool of decoding threads costs
  # more CPU per record than it saves on 64-pixel images, and the CPU is the
  # step's (data.pipeline).
  c.data.threads = 1
  c.batch_size = 128
  # remat "none": the CPU has memory to spare, so nothing is recomputed.
  # scan False: the stacks are two blocks deep, and on XLA:CPU a scanned
  # stack's loop costs more than it saves: the order-3 step at this shape
  # takes 347-355 ms scanned and 267-273 ms unrolled (`python -m
  # dinorank_jax.bench --suite step --orders 0,3 --ab scan=false`,
  # docs/performance.md). Exports hold the scanned layout either way.
  # float32: XLA:CPU computes bfloat16 matmuls by converting, so the paper's
  # bfloat16 only slows the CPU: the order-3 step at this shape takes 290 ms
  # in float32 and 372 ms in bfloat16 (`python -m dinorank_jax.bench --suite
  # step --orders 3 --model scan=false --ab dtype=bfloat16`, docs/training.md).
  c.model.update(embed_dim=64, image_trunk="tiny/8", text_trunk="tiny",
                 image_student="tiny/8", text_student="tiny", rank_head_dim=16, remat="none",
                 scan=False, dtype="float32")
  c.objective.high_order_len = None
  c.optim.update(lr=2e-3, warmup_steps=100)
  c.checkpoint.every = 200
  c.log_every = 20
  c.eval_every = 0
  c.eval_batch_size = 256
  c.eval.data_dir = "data/demo"     # the synthetic suite's corpus (python -m dinorank_jax.sweep)
  return c
