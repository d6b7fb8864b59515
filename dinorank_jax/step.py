"""The DinoRankCLIP objective (method §6, paper eq. 4) and the sharded train step.

    L = L_CLIP + λ(t) (L_cross^R + L_in^R)
        + α_I (L_Gram^I + β L_rel^I) + α_T (L_Gram^T + β L_rel^T)
        + λ_fg mean(g²) + λ_g Σ_r (r − 1) g_r²
        [+ λ_in L_cyc^in + λ_cross L_cyc^cross   for the CyCLIP baseline]

and, for the ALIP baseline (`Objective.alip`), L_CLIP becomes ALIP's
adaptive loss over both paths, raw text and synthetic caption
(`losses/alip.py`), whose gates keep running means in `TrainState.stats`.

The model's forward pass runs under `jax.jit` with the batch sharded over the
mesh (`parallel.BATCH`) and the state placed by `parallel.state_shardings`;
the terms that need explicit collectives or the *local* batch
(InfoNCE and the rank terms over the global batch, RKD across each shard's
own rows) run inside one `shard_map`. Randomness (rank tie-breaks, RKD
triples) is drawn from `fold_in(seed, step)`, so a resumed run draws the same.
"""

import dataclasses
import functools
from typing import Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dinorank_jax import optim
from dinorank_jax.checkpoint import abstract_state
from dinorank_jax.losses.alip import consistency_gates, initial_momenta
from dinorank_jax.losses.contrastive import clip_loss
from dinorank_jax.losses.cyclip import cyclic_losses
from dinorank_jax.losses.distill import align_teacher_grid, distill_loss

from dinorank_jax.losses.ranking import gate_penalty, rank_losses
from dinorank_jax.models import DinoRankCLIP, list_heads
from dinorank_jax.models.vit import normalise_images, vit_size
from dinorank_jax.pooling import masked_adaptive_avg_pool
from dinorank_jax.data.records import SKIP_REASONS
from dinorank_jax.data.tokenizer import CONTEXT_LENGTH
from dinorank_jax.parallel import BATCH, FSDP, state_shardings

@dataclasses.dataclass(frozen=True)
class Objective:
  """The weights and knobs of eq. 4 (defaults: method §6)."""
  rank_max: float = 0.125           # λ_max of both rank terms
  rank_schedule: str = "cosine"
  list_len: int | None = None
  high_order_len: int | None = 128
  pl_eps: float = 0.0               # RankCLIP's published ListMLE eps; 0 is exact
  rank_scope: str = "global"
  alpha_image: float = 1.0
  alpha_text: float = 0.5
  beta: float = 1.0
  fusion_gate: float = 1e-4         # λ_fg
  rank_gate: float = 1e-4           # λ_g
  cyclic_in: float = 0.0             # CyCLIP's λ_in (its paper: 0.25)
  cyclic_cross: float = 0.0          # CyCLIP's λ_cross (its paper: 0.25)
  alip: bool = False                 # ALIP's bi-path adaptive loss (needs syn_tokens)
  criterion: str = "gram_rel"
  text_slots: int = 16              # L_t
  rkd_max_triples: int = 4096


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  stats: dict          # running statistics of the objective (ALIP's momenta), else empty


def distillation(objective: Objective, side: str, out: dict, batch: dict,
                 student_grid: tuple[int, int], key) -> tuple[jax.Array, dict]:
  """`(loss, metrics)` of one student (`side`: "image" or "text") against the
  teacher's fields of `batch`, on these rows: the image student's tokens
  against the teacher grid aligned to each row's crop and flip, the text
  student's tokens and the teacher's pooled to `objective.text_slots`."""
  student = out[f"{side}_student"]
  if side == "image":
    teacher = {"tokens": align_teacher_grid(batch["teacher_patches"], batch["crop"],
                                            batch["flip"], student_grid),
               "cls": batch["teacher_cls"]}
  else:
    pool = functools.partial(masked_adaptive_avg_pool, num_segments=objective.text_slots)
    student = {**student, **{k: pool(student[k], student["mask"])
                             for k in ("tokens", "tokens_proj") if k in student}}
    teacher = {"tokens": pool(batch["teacher_text_tokens"], batch["teacher_text_mask"]),
               "cls": batch["teacher_text_pooled"]}
  return distill_loss(objective.criterion, student, teacher, key=key, beta=objective.beta,
                      max_triples=objective.rkd_max_triples)


def _local_losses(objective, model, params, out, batch, scale, key, active, stats,
                  student_grid):
  """Every loss term on this shard's rows and the updated `stats`; scalars
  equal on every shard."""
  image_head, text_head = list_heads(model, {"params": params})
  tie_key, image_key, text_key = jax.random.split(key, 3)
  weights = {}
  if objective.alip:
    weights, momenta, alip_metrics = consistency_gates(
        out["image"], out["text"], out["caption"], stats["alip_momenta"], BATCH)
    stats = {**stats, "alip_momenta": momenta}
  clip, metrics = clip_loss(out["image"], out["text"], scale, axis_name=BATCH,
                            weights=weights.get("text"))
  cross, in_modal = rank_losses(
      out["image"], out["text"], scale, image_head=image_head, text_head=text_head,
      axis_name=BATCH, scope=objective.rank_scope, tie_key=tie_key, active_order=active,
      list_len=objective.list_len, high_order_len=objective.high_order_len,
      pl_eps=objective.pl_eps)
  terms = {"clip": clip, "rank_cross": cross, "rank_in": in_modal}
  if objective.cyclic_in or objective.cyclic_cross:
    terms["cyclic_in"], terms["cyclic_cross"] = cyclic_losses(out["image"], out["text"], BATCH)
  if objective.alip:
    terms["clip_caption"], _ = clip_loss(out["image"], out["caption"], scale, axis_name=BATCH,
                                         weights=weights["caption"])
    metrics.update(alip_metrics)
  shard = jax.lax.axis_index(BATCH)
  for side, side_key in (("image", image_key), ("text", text_key)):
    if f"{side}_student" in out:
      terms[f"distill_{side}"], m = distillation(objective, side, out, batch, student_grid,
                                                 jax.random.fold_in(side_key, shard))
      metrics.update({f"{side}_{k}": x for k, x in m.items()})
  gates = [out[g] for g in ("image_gate", "text_gate") if g in out]
  if gates:
    terms["fusion_gate"] = jnp.mean(jnp.stack([jnp.mean(g ** 2) for g in gates]))
  # Per-shard terms (distillation, gate means) become batch means.
  terms = {k: jax.lax.pmean(x, BATCH) if k.startswith(("distill", "fusion")) else x
           for k, x in terms.items()}
  metrics = jax.tree.map(lambda x: jax.lax.pmean(x, BATCH), metrics)
  return terms, metrics, stats


def make_train_step(model: DinoRankCLIP, optimizer: optim.Optimizer,
                    objective: Objective, mesh, state_sharding, *, seed: int = 0,
                    skip_nonfinite: bool = False, accum_steps: int = 1,
                    clip_grad_norm: float = 0.0):
  """A jitted `step(state, batch, schedule) -> (state, metrics)`; the state
  is donated.

  `batch` is a dict of global arrays sharded over `BATCH` (see
  `parallel.global_batch`): `image` uint8 `[B, S, S, 3]`, `tokens`, and the
  teacher fields and `crop`, `flip` of `data.pipeline` when students are on,
  and `syn_tokens` for ALIP. `schedule` is the run's `optim.Schedule`,
  traced: the optimiser is built inside the step as
  `optimizer(optim.learning_rate(schedule))`, so no length of the run is a
  constant of the compiled program.
  `state_sharding` places the state (`parallel.state_shardings`). With
  `skip_nonfinite`, a step whose loss is not finite leaves the parameters and
  optimiser state as they were (`metrics["finite"]` says which happened).

  `accum_steps > 1` runs the towers on `accum_steps` micro-batches of the
  batch in turn, but scores the losses on the whole batch, so the step equals
  the one without accumulation (the contrastive and rank terms keep all the
  batch's negatives; see `accumulated_grads`) while the towers' activations
  live for one micro-batch at a time. `clip_grad_norm > 0` scales the
  gradient to at most that global norm before the optimiser (`grad_norm`
  logs the norm before clipping).
  """
  base_key = jax.random.key(seed)
  # Replicated parameters: each norm is one reduction of one joined vector.
  global_norms = functools.partial(optim.global_norms, concatenate=mesh.shape[FSDP] == 1)
  student_patch = vit_size(model.image_student)[3]
  replicated = NamedSharding(mesh, P())
  batch_spec = P(BATCH)

  def forward(params, batch):
    """The towers: per-example outputs (and the shared logit scale)."""
    out = model.apply({"params": params}, normalise_images(batch["image"]), batch["tokens"])
    if objective.alip:   # the second path: the same text tower on the synthetic captions
      out["caption"] = model.apply({"params": params}, batch["syn_tokens"],
                                   method=DinoRankCLIP.embed_texts)["text"]
    return out

  def loss_fn(params, batch, step, stats, schedule):
    return objective_fn(params, forward(params, batch), batch, step, stats, schedule)

  def objective_fn(params, out, batch, step, stats, schedule):
    active = optim.active_order(step, schedule, model.rank_order)
    side = batch["image"].shape[1] // student_patch
    local = jax.shard_map(
        functools.partial(_local_losses, objective, model, student_grid=(side, side)),
        mesh=mesh, in_specs=(P(), batch_spec, batch_spec, P(), P(), P(), P()), out_specs=P())
    rows = {k: x for k, x in out.items() if k != "scale"}
    # Only what the rank heads need enters the shard_map (replicated there);
    # order-0 and order-1 heads have no parameters.
    heads = {k: params[k] for k in (*optim.RANK_HEADS, "logit_scale") if k in params}
    terms, metrics, stats = local(heads, rows, batch, out["scale"],
                                  jax.random.fold_in(base_key, step), active, stats)
    weight = optim.rank_weight(objective.rank_schedule, step, schedule, objective.rank_max)
    penalty = sum(gate_penalty(params.get(h, {}), active) for h in optim.RANK_HEADS)
    loss = (terms["clip"] + terms.get("clip_caption", 0.0)
            + weight * (terms["rank_cross"] + terms["rank_in"])
            + objective.alpha_image * terms.get("distill_image", 0.0)
            + objective.alpha_text * terms.get("distill_text", 0.0)
            + objective.fusion_gate * terms.get("fusion_gate", 0.0)
            + objective.rank_gate * penalty
            + objective.cyclic_in * terms.get("cyclic_in", 0.0)
            + objective.cyclic_cross * terms.get("cyclic_cross", 0.0))
    gates = {f"{h}_{k}": jax.nn.sigmoid(a) for h in optim.RANK_HEADS
             for k, a in params.get(h, {}).items() if k.startswith("gate_")}   # g_r = σ(a_r)
    metrics = {**metrics, **terms, **gates, "rank_gate_penalty": penalty, "rank_weight": weight,
               "active_order": active, "logit_scale": out["scale"], "loss": loss}
    return loss, (metrics, stats)

  def accumulated_grads(params, batch, step, stats, schedule):
    """`value_and_grad(loss_fn)` over `accum_steps` micro-batches: the towers
    run micro-batch by micro-batch (first without gradients, for the outputs),
    the objective on all outputs together, and the outputs' cotangents are
    pulled back through the towers one micro-batch at a time."""
    n = jax.tree.leaves(batch)[0].shape[0]
    rows = n // accum_steps
    # Micro-batch a holds rows a, a + A, a + 2A, …: each is spread over every
    # device like the batch, and merging restores the batch's own order.
    split = lambda x: jnp.swapaxes(x.reshape(rows, accum_steps, *x.shape[1:]), 0, 1)
    merge = lambda x: jnp.swapaxes(x, 0, 1).reshape(n, *x.shape[2:])
    micro = jax.tree.map(split, batch)
    stacked = jax.lax.map(lambda mb: forward(params, mb), micro)
    # Every output is per example but the logit scale, shared by the batch.
    out = {k: v[0] if k == "scale" else jax.tree.map(merge, v) for k, v in stacked.items()}
    (loss, aux), (grads, cotangents) = jax.value_and_grad(
        objective_fn, argnums=(0, 1), has_aux=True, allow_int=True)(params, out, batch, step,
                                                                    stats, schedule)
    # The scale's cotangent is pulled back once, with micro-batch 0; integer
    # and boolean outputs (masks) have none: a zero stand-in travels through the scan.
    exact = lambda x: jnp.issubdtype(x.dtype, jnp.inexact)
    first = lambda g: jnp.zeros((accum_steps, *g.shape), g.dtype).at[0].set(g)
    cotangents = {k: first(g) if k == "scale" else jax.tree.map(
        lambda g, x: split(g) if exact(x) else jnp.zeros(accum_steps), g, out[k])
                  for k, g in cotangents.items()}
    shapes = jax.tree.map(lambda x: x[0], stacked)      # one micro-batch's outputs

    def pull_back(total, xs):
      mb, g = xs
      g = jax.tree.map(lambda c, x: c if exact(x) else np.zeros(x.shape, jax.dtypes.float0),
                       g, shapes)
      _, vjp = jax.vjp(lambda p: forward(p, mb), params)
      return jax.tree.map(jnp.add, total, vjp(g)[0]), None

    grads, _ = jax.lax.scan(pull_back, grads, (micro, cotangents))
    return (loss, aux), grads

  value_and_grads = (jax.value_and_grad(loss_fn, has_aux=True) if accum_steps == 1
                     else accumulated_grads)

  def step_fn(state: TrainState, batch, schedule: optim.Schedule):
    tags = optim.order_tags(state.params)
    (loss, (metrics, stats)), grads = value_and_grads(state.params, batch, state.step,
                                                      state.stats, schedule)
    if clip_grad_norm:
      grad_norm = global_norms(grads)[0]
      grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip_grad_norm / (grad_norm + 1e-6)),
                           grads)
    tx = optimizer(optim.learning_rate(schedule))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = optim.freeze_inactive(updates, tags, metrics["active_order"])
    params = optax.apply_updates(state.params, updates)
    norms = global_norms(grads, params, updates)
    metrics.update(param_norm=norms[1], update_norm=norms[2],
                   grad_norm=grad_norm if clip_grad_norm else norms[0])
    finite = jnp.isfinite(loss)
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
      stats = jax.tree.map(keep, stats, state.stats)
    metrics["finite"] = finite
    metrics["data_skipped"] = (jnp.sum(batch["skipped"], axis=0) if "skipped" in batch
                               else jnp.zeros(len(SKIP_REASONS), jnp.int32))
    return TrainState(state.step + 1, params, opt_state, stats), metrics

  return jax.jit(step_fn, in_shardings=(state_sharding, NamedSharding(mesh, batch_spec),
                                        replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)


class TrainProgram(NamedTuple):
  """The trainer's programs for one model on one mesh (`build`)."""
  init: Callable          # jitted `init(images, tokens) -> TrainState`, created in place
  step: Callable          # jitted `step(state, batch, schedule) -> (state, metrics)`
  shardings: TrainState   # where each part of the state lives (`parallel.state_shardings`)
  abstract: TrainState    # the state's shapes and dtypes, placed by `shardings`
  inputs: tuple           # the shapes `init` is called with (`abstract_inputs`)

  def new_state(self) -> TrainState:
    """Parameters, optimiser state and the objective's statistics, created in place."""
    return self.init(*(jnp.zeros(x.shape, x.dtype) for x in self.inputs))


def build(model: DinoRankCLIP, optimizer: optim.Optimizer, objective: Objective, mesh,
          image_size: int, *, seed: int = 0, **step_options) -> TrainProgram:
  """The state initialiser and the train step (`make_train_step` with
  `step_options`) of `model` at `image_size` on `mesh`: the one place the
  trainer, the benchmarks and the tests build them.

  `init` takes uint8 `[1, S, S, 3]` images and int `[1, L]` tokens
  (`abstract_inputs`) and creates the state with the shardings of
  `parallel.state_shardings`; nothing is allocated until it is called
  (`TrainProgram.new_state`), so `abstract` serves ahead-of-time compiles.
  """
  def init(images, tokens):
    params = model.init(jax.random.key(seed), normalise_images(images), tokens)["params"]
    stats = {"alip_momenta": initial_momenta()} if objective.alip else {}
    # The optimiser's state does not depend on its learning rate's schedule.
    opt_state = optimizer(optim.learning_rate(optim.Schedule(1, 1, 0.0, 0))).init(params)
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state, stats)
  inputs = abstract_inputs(image_size)
  shapes = jax.eval_shape(init, *inputs)
  shardings = state_shardings(shapes, mesh)
  abstract = abstract_state(shapes, shardings)
  step = make_train_step(model, optimizer, objective, mesh, shardings, seed=seed,
                         **step_options)
  return TrainProgram(jax.jit(init, out_shardings=shardings), step, shardings, abstract, inputs)


def abstract_inputs(image_size: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """The shapes `TrainProgram.init` is called with."""
  return (jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8),
          jax.ShapeDtypeStruct((1, CONTEXT_LENGTH), jnp.int32))
