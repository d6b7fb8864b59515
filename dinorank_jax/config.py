"""The training config: every knob of a run, with the paper's values (method §6, §7).

Pure data (ml_collections, no JAX), so a config file is cheap to load and
print. The files in `configs/` start from `paper()` and change what their
experiment changes; any field can be overridden on the command line,
`--config.batch_size=1024`, `--config.model.rank_order=2`.
"""

import os

from ml_collections import ConfigDict, FieldReference

DATA_HELP = ("set --config.data.path to a records directory with teacher features "
             "(docs/data.md: dinorank_jax.data.build, then dinorank_jax.teacher.export)")


def default_compilation_cache() -> str:
  """Where compiled programs are cached unless told otherwise: JAX's own
  `$JAX_COMPILATION_CACHE_DIR` when set, else `$XDG_CACHE_HOME/dinorank_jax/jax`
  (`~/.cache/dinorank_jax/jax`)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "dinorank_jax", "jax")


def paper(*, order: int = 3, epochs: int = 64, students: str = "both",
          fusion_mode: str = "full") -> ConfigDict:
  """The main recipe: ViT-B/32 + CLIP text trunk, ViT-Ti/16 students, order
  3, global batch 4096, 64 epochs on CC3M."""
  c = ConfigDict()
  c.seed = 0
  c.init_from = ""                          # trunks from an export or CLIP checkpoint
  c.batch_size = 4096                       # global, over every device of every host
  c.epochs = epochs

  c.data = ConfigDict()
  c.data.path = ""                          # records with teacher features (required)
  c.data.eval_path = ""                     # held-out records; "" = no evaluation
  c.data.num_records = FieldReference(None, field_type=int)   # first N records (subsets)
  c.data.image_size = 224
  c.data.threads = 16                       # decoding threads per process
  c.data.worker_count = 0                   # Grain worker processes per process
  c.data.prepare = ""                       # "synthetic": build the demo corpus if absent
  c.data.max_skip_fraction = 0.01           # bad records tolerated (skipped, counted, named)

  c.model = ConfigDict()
  c.model.embed_dim = 512
  c.model.image_trunk = "B/32"
  c.model.text_trunk = "B"
  c.model.image_student = "Ti/16"
  c.model.text_student = "Ti"
  c.model.students = students               # none | image | both
  c.model.fusion_mode = fusion_mode
  c.model.rank_order = order
  c.model.rank_head_dim = 64
  c.model.rank_chunk_size = 16
  c.model.dtype = "bfloat16"                # compute dtype; parameters stay float32
  c.model.scan = True                       # each stack of blocks is one nn.scan
  # What each block keeps for the backward pass: none | all_dots | dots | full.
  # all_dots is the least recomputation with which 512 rows per device fit an
  # H100 80GB (docs/performance.md § GPU memory).
  c.model.remat = "all_dots"
  c.model.attention = "flax"                # flax | xla | cudnn | auto (models/layers.py)
  c.model.arch = "dinorank"                 # dinorank | openai | open_clip: how the trunks are built

  c.objective = ConfigDict()                # step.Objective
  c.objective.rank_max = 0.125
  c.objective.rank_schedule = "cosine"
  c.objective.list_len = FieldReference(None, field_type=int)
  c.objective.high_order_len = FieldReference(128, field_type=int)
  c.objective.pl_eps = 0.0                  # > 0: RankCLIP's published ListMLE (docs/ranking.md)
  c.objective.rank_scope = "global"
  c.objective.alpha_image = 1.0
  c.objective.alpha_text = 0.5
  c.objective.beta = 1.0
  c.objective.fusion_gate = 1e-4
  c.objective.rank_gate = 1e-4
  c.objective.cyclic_in = 0.0               # CyCLIP baseline only
  c.objective.cyclic_cross = 0.0
  c.objective.alip = False                  # ALIP baseline only
  c.objective.criterion = "gram_rel"
  c.objective.text_slots = 16
  c.objective.rkd_max_triples = 4096

  c.optim = ConfigDict()
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 2000
  c.optim.weight_decay = 0.2
  c.optim.accum_steps = 1                   # micro-batches per step; the step is unchanged
  c.optim.clip_grad_norm = 0.0              # > 0: clip the gradient's global norm

  c.mesh = ConfigDict()
  c.mesh.fsdp = 1                           # > 1 shards parameters and optimiser state

  c.checkpoint = ConfigDict()
  c.checkpoint.every = 1000                 # steps; also at the end and on SIGTERM
  c.checkpoint.max_to_keep = 3

  c.log_every = 50
  c.log = ConfigDict()
  c.log.wandb = False                       # also log to Weights & Biases (the wandb extra)
  c.log.wandb_project = "dinorank_jax"
  c.eval_every = 5000                       # steps; also at the end
  c.eval_batch_size = 1024
  # Evaluation suites run on the live parameters at eval_every and at the end
  # (python -m dinorank_jax.evaluate's names: "imagenet,wds:/data/wds_vtab-cifar10",
  # groups too), logged as eval/<dataset>/<metric>; looked for under data_dir.
  c.eval = ConfigDict()
  c.eval.suites = ""
  c.eval.data_dir = "data"
  # Keep the checkpoint of the best value of one logged metric ("eval/imagenet/acc1",
  # "zero_shot/colour") beside the last max_to_keep: export --step best.
  c.eval.keep_best = ""
  c.eval.keep_best_mode = "max"             # max | min
  c.on_nonfinite = "stop"                   # stop | skip (the update)
  c.compilation_cache = default_compilation_cache()   # "" = off
  c.device_memory_gib = 0.0                 # > 0: the per-device budget the step must fit
  return c


def ablation(**kw) -> ConfigDict:
  """The ablation setting of Appendix E: the first 1 M records, 32 epochs."""
  c = paper(epochs=32, **kw)
  c.data.num_records = 1_000_000
  return c


def baseline(order: int) -> ConfigDict:
  """CLIP (order 0) or RankCLIP (order 1): no students, no fusion, RankCLIP's
  linear rank-weight ramp."""
  c = paper(order=order, students="none")
  c.objective.rank_schedule = "rankclip_linear"
  return c
