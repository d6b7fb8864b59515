"""The towers' stacks and dtypes: scanned equals unrolled, every remat policy
computes the same thing, bfloat16 all the way through the residual streams,
and the layouts written before scanning are converted or refused in one line."""

import functools
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dinorank_jax import checkpoint, config as config_lib, export, models, train
from dinorank_jax.data.tokenizer import CLIP_BPE_ID
from dinorank_jax.models import DinoRankCLIP, TextStudent, TextTransformer, ViT
from dinorank_jax.models.layers import Block, Encoder, stack_layers
from dinorank_jax.models.summary import count
from tests import tiny_corpus
from tests.model_sizes import EOT, IMAGE, VOCAB, tiny_model, tokens
from tests.tiny_config import lean_config

TOKENS = tokens([3, 5, 0, 70])
TOWERS = {"image trunk": ViT("tiny/16", 16), "image student": ViT("tiny/8"),
          "text trunk": TextTransformer("tiny", 16, vocab_size=VOCAB, eot_id=EOT),
          "text student": TextStudent("tiny", vocab_size=VOCAB, eot_id=EOT)}


def _images(b=4):
  return jax.random.normal(jax.random.key(0), (b, IMAGE, IMAGE, 3))


def _inputs(tower):
  return (TOKENS,) if isinstance(tower, (TextTransformer, TextStudent)) else (_images(),)


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_scanned_tower_with_restacked_weights_equals_the_unrolled_one(name):
  scanned = TOWERS[name].clone(dtype=jnp.float32)
  unrolled = scanned.clone(scan=False)
  x = _inputs(scanned)
  params = unrolled.init(jax.random.key(1), *x)["params"]
  assert "block_0" in params["encoder"] and "blocks" not in params["encoder"]
  stacked = stack_layers(params)
  layers = jax.tree.leaves(stacked["encoder"]["blocks"])
  assert all(leaf.shape[0] == 2 for leaf in layers)             # tiny: 2 layers
  assert jax.tree.structure(stacked) == jax.tree.structure(
      jax.eval_shape(scanned.init, jax.random.key(1), *x)["params"])
  # float32 rounding only: XLA fuses the loop body and the unrolled blocks
  # differently, and which fusion it picks depends on the CPU (1.3e-6 seen).
  chex.assert_trees_all_close(scanned.apply({"params": stacked}, *x),
                              unrolled.apply({"params": params}, *x), rtol=1e-5, atol=1e-5)


def test_whole_model_scanned_equals_unrolled_and_counts_the_same_parameters():
  unrolled = tiny_model(scan=False, dtype=jnp.float32)
  params = unrolled.init(jax.random.key(0), _images(), TOKENS)["params"]
  ours = tiny_model(dtype=jnp.float32).apply({"params": stack_layers(params)}, _images(), TOKENS)
  theirs = unrolled.apply({"params": params}, _images(), TOKENS)
  # The embeddings to 1e-6; the students' unnormalised tokens (|x| up to ~3)
  # differ by float32 rounding of reductions XLA orders differently.
  for key in ("image", "text", "image_gate", "text_gate"):
    np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-5)
  abstract = lambda m: jax.eval_shape(
      m.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
      jax.ShapeDtypeStruct((1, 77), jnp.int32))["params"]
  assert count(abstract(DinoRankCLIP())) == count(abstract(DinoRankCLIP(scan=False)))


@pytest.mark.parametrize("remat", ["all_dots", "dots", "full"])
def test_remat_policies_change_neither_outputs_nor_gradients(remat):
  encoder = Encoder(2, 2, dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(0), (3, 5, 16))
  params = encoder.init(jax.random.key(1), x)
  loss = lambda m, p: jnp.sum(m.apply(p, x) ** 2)
  for layout in (dict(scan=True), dict(scan=False)):
    plain = encoder.clone(**layout)
    p = params if layout["scan"] else {"params": _unstack(params["params"])}
    recomputed = plain.clone(remat=remat)
    chex.assert_trees_all_close(jax.grad(functools.partial(loss, recomputed))(p),
                                jax.grad(functools.partial(loss, plain))(p), rtol=1e-5,
                                atol=1e-9)
  with pytest.raises(ValueError, match="config.model.remat"):
    encoder.clone(remat="some").init(jax.random.key(1), x)


@pytest.mark.parametrize("attention", ["xla", "auto"])
def test_fused_attention_equals_flax_attention_with_masks(attention):
  """float32: both compute softmax(QKᵀ/√d)V; only summation order differs."""
  for name in ("image student", "text trunk", "text student"):    # none, causal, padding
    tower = TOWERS[name].clone(dtype=jnp.float32)
    inputs = (jax.random.uniform(jax.random.key(2), (2, IMAGE, IMAGE, 3))
              if name.startswith("image") else TOKENS)
    params = tower.init(jax.random.key(0), inputs)
    fused = tower.clone(attention=attention)
    chex.assert_trees_all_close(fused.apply(params, inputs), tower.apply(params, inputs),
                                rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="config.model.attention"):
    Encoder(1, 2, attention="flash").init(jax.random.key(1), jnp.zeros((1, 3, 8)))


def _unstack(params):
  blocks = params["blocks"]
  depth = jax.tree.leaves(blocks)[0].shape[0]
  return {"norm": params["norm"],
          **{f"block_{i}": jax.tree.map(lambda a: a[i], blocks) for i in range(depth)}}


def _recorded_dtypes(tower, x):
  """`(module path, kind, dtype)` of every floating input and output of the
  blocks, LayerNorms, attention, Dense and Conv layers, traced through the
  tower (scans included)."""
  seen = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if isinstance(module, (Block, nn.LayerNorm, nn.Dense, nn.Conv, nn.Embed,
                           nn.MultiHeadDotProductAttention)) and context.method_name == "__call__":
      arrays = [("input", a) for a in args[:1]] + [("output", o) for o in jax.tree.leaves(out)]
      seen.extend(("/".join(module.path), kind, a.dtype) for kind, a in arrays
                  if jnp.issubdtype(a.dtype, jnp.floating))
    return out

  params = tower.init(jax.random.key(0), *x)["params"]
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(tower.apply, {"params": params}), *x)
  return params, seen


def _matmul_operand_dtypes(fn, *args):
  """Dtypes of the operands of every dot_general and convolution in `fn`'s
  jaxpr, sub-jaxprs (scan bodies) included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        found.extend(v.aval.dtype for v in eqn.invars)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("name", sorted(TOWERS))
@pytest.mark.parametrize("scan", [True, False])
def test_bfloat16_towers_keep_every_activation_and_matmul_in_bfloat16(name, scan):
  tower = TOWERS[name].clone(scan=scan)                 # dtype bfloat16 by default
  x = _inputs(tower)
  params, seen = _recorded_dtypes(tower, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  kinds = {path.split("/")[-1].rstrip("_0123456789") for path, _, _ in seen}
  assert {"LayerNorm", "Dense", "MultiHeadDotProductAttention"} <= kinds, kinds
  # Inputs of the tower's first layer (pixels) may be float32; nothing after.
  wrong = [(p, k, d) for p, k, d in seen if d != jnp.bfloat16
           and not (k == "input" and p.endswith("patch_embed"))]
  assert not wrong, wrong
  operands = _matmul_operand_dtypes(functools.partial(tower.apply, {"params": params}), *x)
  assert operands and all(d == jnp.bfloat16 for d in operands), set(operands)


def test_one_list_of_model_fields_for_config_trainer_and_export():
  c = config_lib.paper()
  assert set(models.CONFIG_FIELDS) == set(c.model)
  model = models.from_config(c.model, vocab_size=VOCAB, eot_id=EOT)
  for field in models.CONFIG_FIELDS:
    expected = jnp.dtype(c.model[field]) if field == "dtype" else c.model[field]
    assert getattr(model, field) == expected, field


def test_an_export_written_before_scanning_loads_through_the_converter(tmp_path):
  """A format-1 export (unrolled `block_{i}`, no `scan` field) loads into the
  scanned model and embeds exactly as the unrolled network it holds."""
  fields = dict(embed_dim=16, image_trunk="tiny/16", text_trunk="tiny", image_student="tiny/8",
                text_student="tiny", students="both", fusion_mode="full", vocab_size=VOCAB,
                eot_id=EOT, dtype="float32")
  unrolled = DinoRankCLIP(**{**fields, "dtype": jnp.float32}, scan=False, rank_order=0)
  images = np.random.default_rng(0).integers(0, 256, (4, IMAGE, IMAGE, 3), dtype=np.uint8)
  params = unrolled.init(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)), TOKENS[:1])["params"]
  saver = ocp.StandardCheckpointer()
  saver.save(str(tmp_path / "params"), params)
  saver.wait_until_finished()
  with open(tmp_path / export.CONFIG_FILE, "w") as f:
    json.dump({"format_version": 1, "model": fields, "image_size": IMAGE,
               "tokenizer": CLIP_BPE_ID, "context_length": 77, "source": {}}, f)
  loaded = export.load(str(tmp_path), batch_size=4)
  assert loaded.model.scan and "blocks" in loaded.params["image_tower"]["encoder"]
  expected = unrolled.apply({"params": params}, models.vit.normalise_images(images),
                            method=DinoRankCLIP.embed_images)["image"]
  np.testing.assert_allclose(loaded.encode_image(images), expected, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_another_layout_is_refused_in_one_line():
  unrolled = {"image_tower": {"encoder": {"block_0": {"w": 1}, "block_1": {"w": 1}}}}
  scanned = {"image_tower": {"encoder": {"blocks": {"w": 1}}}}
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match=r"^checkpoint 8 in D holds unrolled .* --config.model.scan=False$"):
    checkpoint.check_params(unrolled, scanned, "checkpoint 8 in D")
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match="--config.model.scan=True$"):
    checkpoint.check_params(scanned, unrolled, "checkpoint 8 in D")
  wider = {"image_tower": {"encoder": {"blocks": {"w": 1}}, "projection": {"kernel": 1}}}
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match="lacks the model's image_tower/projection/kernel"):
    checkpoint.check_params(scanned, wider, "checkpoint 8 in D")
  checkpoint.check_params(scanned, scanned, "checkpoint 8 in D")


@pytest.mark.slow
def test_resuming_an_unrolled_run_with_scanned_stacks_names_the_flag(tmp_path):
  """Slow: the unrolled layout is a program no other test compiles; it trains, is refused, then
  resumes."""
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=64, num_eval=32)
  config = lean_config(root)
  config.epochs, config.data.eval_path = 1, ""           # 2 steps
  config.model.scan = False
  train.train_and_evaluate(config, str(tmp_path / "run"))
  config.model.scan, config.epochs = True, 2
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"^checkpoint 2 in .* holds unrolled encoder "
                     r"layers .*: resume it with --config.model.scan=False$"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config.model.scan = False
  train.train_and_evaluate(config, str(tmp_path / "run"))   # resumes as it was started
