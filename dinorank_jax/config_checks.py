"""Every config field, and every shape the model and step assume, checked
before the data is prepared or anything is built or compiled: `validate`
(the config alone: ranges, choices, patches against the image side, the
batch over the devices and micro-batches, the rank lists) and `check_data`
(the config against its dataset's metadata). Each failure is one
`ConfigError` line naming the setting to change.
"""

import importlib.util

import jax

from dinorank_jax import config as config_lib
from dinorank_jax import optim
from dinorank_jax.checkpoint import MODES
from dinorank_jax.data import records
from dinorank_jax.evaluate import suites
from dinorank_jax.errors import UserError
from dinorank_jax.losses.distill import CRITERIA
from dinorank_jax.models.dinorankclip import ARCHS, STUDENT_MODES
from dinorank_jax.models.fusion import FUSION_MODES
from dinorank_jax.models.layers import ATTENTION, REMAT_POLICIES
from dinorank_jax.models.text import CONTEXT_LENGTH as TEXT_CONTEXT, TEXT_SIZES
from dinorank_jax.models.vit import VIT_SIZES, vit_size

NONFINITE = ("stop", "skip")
MAX_RANK_ORDER = 5          # the orders the paper studies and the tests cover (configs/r0..r5)


class ConfigError(UserError, ValueError):
  """A config that cannot run; the message names the setting to change."""


def _choice(config, name: str, choices) -> None:
  value = config
  for part in name.split("."):
    value = value[part]
  if value not in choices:
    raise ConfigError(f"config.{name} must be one of {tuple(choices)}, got {value!r}")


def _at_least(config, name: str, low, *, optional: bool = False) -> None:
  value = config
  for part in name.split("."):
    value = value[part]
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
    raise ConfigError(f"config.{name} must be a number >= {low}"
                      f"{' (or None)' if optional else ''}, got {value!r}")


def validate(config) -> None:
  """One clear line for the first field that cannot run, before anything is built."""
  for name in ("batch_size", "epochs", "eval_batch_size", "log_every", "checkpoint.every",
               "checkpoint.max_to_keep", "data.image_size", "data.threads",
               "model.embed_dim", "model.rank_head_dim", "model.rank_chunk_size",
               "objective.text_slots", "objective.rkd_max_triples", "optim.accum_steps"):
    _at_least(config, name, 1)
  for name in ("eval_every", "device_memory_gib", "data.worker_count", "optim.warmup_steps",
               "optim.weight_decay", "optim.lr", "optim.clip_grad_norm", "objective.rank_max",
               "objective.pl_eps", "objective.alpha_image", "objective.alpha_text",
               "objective.beta", "objective.fusion_gate", "objective.rank_gate",
               "objective.cyclic_in", "objective.cyclic_cross"):
    _at_least(config, name, 0)
  _at_least(config, "objective.list_len", 1, optional=True)
  _at_least(config, "objective.high_order_len", 0, optional=True)
  _at_least(config, "data.num_records", 1, optional=True)
  _at_least(config, "mesh.fsdp", 1)
  if not 0 <= config.data.max_skip_fraction < 1:
    raise ConfigError("config.data.max_skip_fraction must be in [0, 1), got "
                      f"{config.data.max_skip_fraction!r}")
  if config.optim.lr == 0:
    raise ConfigError("config.optim.lr must be > 0, got 0")
  if not (isinstance(config.model.rank_order, int)
          and 0 <= config.model.rank_order <= MAX_RANK_ORDER):
    raise ConfigError(f"config.model.rank_order must be an integer in 0..{MAX_RANK_ORDER} "
                      f"(0 = CLIP, 1 = RankCLIP), got {config.model.rank_order!r}")
  for name in ("image_trunk", "image_student"):
    try:
      patch = vit_size(config.model[name])[3]
      if patch < 1:
        raise ValueError
    except ValueError:
      raise ConfigError(f"config.model.{name} must be '<size>/<patch>' with size in "
                        f"{sorted(VIT_SIZES)}, e.g. 'B/32', got {config.model[name]!r}") from None
    if name == "image_student" and config.model.students == "none":
      continue
    side = config.data.image_size
    if side % patch:
      raise ConfigError(f"config.model.{name}={config.model[name]} cuts "
                        f"config.data.image_size={side} into {side / patch:.3g} patches a "
                        "side: the side must be a multiple of the patch, e.g. "
                        f"--config.data.image_size={patch * max(side // patch, 1)}")
  _choice(config, "model.text_trunk", TEXT_SIZES)
  _choice(config, "model.text_student", TEXT_SIZES)
  _choice(config, "model.students", STUDENT_MODES)
  _choice(config, "model.fusion_mode", FUSION_MODES)
  _choice(config, "model.remat", REMAT_POLICIES)
  _choice(config, "model.attention", ATTENTION)
  _choice(config, "model.arch", ARCHS)
  _choice(config, "model.dtype", ("float32", "bfloat16"))
  _choice(config, "objective.rank_schedule", optim.RANK_SCHEDULES)
  _choice(config, "objective.rank_scope", ("global", "local"))
  _choice(config, "objective.criterion", CRITERIA)
  _choice(config, "on_nonfinite", NONFINITE)
  _choice(config, "data.prepare", ("", "synthetic"))
  _check_rank_lists(config)
  _check_batch(config)
  eval_suites(config)
  _choice(config, "eval.keep_best_mode", MODES)
  if config.eval.keep_best and not (config.data.eval_path or config.eval.suites):
    raise ConfigError(f"config.eval.keep_best={config.eval.keep_best} needs an evaluation: set "
                      "config.data.eval_path (held-out records) or config.eval.suites")
  if config.log.wandb and importlib.util.find_spec("wandb") is None:
    raise ConfigError("config.log.wandb is on but wandb is not installed: pip install "
                      "'dinorank_jax[wandb]', or set --config.log.wandb=False")


def eval_suites(config) -> list[str]:
  """The suite names of `config.eval.suites`, groups expanded (none: [])."""
  listed = config.eval.suites
  names = [n.strip() for n in listed.split(",") if n.strip()]
  try:
    return suites.expand(names)
  except ValueError as e:
    raise ConfigError(f"config.eval.suites: {e}") from None


def _check_rank_lists(config) -> None:
  """Order r conditions position k on the r − 1 items ranked before it, so a
  list must score at least r positions, with corrections, for order r to act."""
  order = config.model.rank_order
  if order < 2:
    return
  for name in ("list_len", "high_order_len"):
    value = config.objective[name]
    if value is not None and value < order:
      raise ConfigError(f"config.objective.{name}={value} leaves config.model.rank_order="
                        f"{order} no position to act on (it needs {order}): set "
                        f"--config.objective.{name}={order} or more, or None (every position)")


def _check_batch(config) -> None:
  """The batch over the devices, the micro-batches and the rank lists."""
  devices = jax.device_count()
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % devices or config[name] % jax.process_count():
      raise ConfigError(f"config.{name}={config[name]} must be a multiple of the "
                        f"{devices} devices")
  if config.batch_size % (config.optim.accum_steps * devices):
    raise ConfigError(f"config.batch_size={config.batch_size} must be a multiple of "
                      f"config.optim.accum_steps={config.optim.accum_steps} x {devices} devices "
                      "(every micro-batch is spread over every device)")
  # The items of a rank list: the batch (accumulation scores the whole
  # batch), or with the local scope one device's share of it.
  items = config.batch_size // (devices if config.objective.rank_scope == "local" else 1)
  if items < config.model.rank_order:
    raise ConfigError(f"config.model.rank_order={config.model.rank_order} ranks lists of "
                      f"{items} items (config.batch_size={config.batch_size}, "
                      f"objective.rank_scope={config.objective.rank_scope}, {devices} devices): "
                      "a list needs at least as many items as the order")


def check_data(config, meta: dict | None) -> None:
  """One clear line for each way a config and its data can disagree."""
  if not config.data.path:
    raise ConfigError(f"config.data.path is not set: {config_lib.DATA_HELP}")
  if meta is None:
    raise ConfigError(f"config.data.path={config.data.path} holds no dataset "
                      f"({records.METADATA} missing): {config_lib.DATA_HELP}")
  if config.model.students != "none" and not meta.get("teacher"):
    raise ConfigError(f"config.data.path={config.data.path} has no teacher features: run "
                      "python -m dinorank_jax.teacher.export on it (docs/data.md), or set "
                      "--config.model.students=none")
  if config.objective.alip and not meta["counts"].get("syn_caption"):
    raise ConfigError(f"config.objective.alip needs synthetic captions, and "
                      f"config.data.path={config.data.path} has none: rebuild it with a "
                      "syn_caption column or {key}.syn.txt members (docs/data.md)")
  length = meta.get("context_length", TEXT_CONTEXT)
  if length > TEXT_CONTEXT:
    raise ConfigError(f"config.data.path={config.data.path} holds captions of {length} tokens, "
                      f"more than the text tower's context of {TEXT_CONTEXT}: rebuild it with "
                      "python -m dinorank_jax.data.build (docs/data.md)")
