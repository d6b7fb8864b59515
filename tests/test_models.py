"""Shapes, dtypes, sizes and switches of the networks (method §5, §7)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinorank_jax.losses.ranking import rank_losses
from dinorank_jax.models.rank_head import HighOrderPL
from dinorank_jax.models import TextStudent, TextTransformer, ViT, list_heads
from dinorank_jax.models.summary import count
from dinorank_jax.models.dinorankclip import normalise
from tests.model_sizes import EOT, IMAGE, VOCAB, tiny_model, tokens


def _images(b=4, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, IMAGE, IMAGE, 3))


def _abstract_count(module, *shapes):
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  return count(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])


@pytest.mark.slow
def test_full_model_shapes_and_bf16_compute_with_float32_params():
  """Slow: the tiny model with every part on, initialised and applied eagerly (op by op, each op
  its own small program), as a user's first call runs."""
  model = tiny_model()
  variables = model.init(jax.random.key(0), _images(), tokens([3, 5, 0, 70]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = model.apply(variables, _images(), tokens([3, 5, 0, 70]))
  chex.assert_shape([out["image"], out["text"], out["image_gate"], out["text_gate"]], (4, 16))
  chex.assert_type([out["image"], out["text"], out["scale"]], jnp.float32)
  np.testing.assert_allclose(jnp.linalg.norm(out["image"], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["scale"], 1 / 0.07, rtol=1e-5)
  chex.assert_shape(out["image_student"]["tokens"], (4, 16, 32))        # 32/8 = 4 x 4 patches
  chex.assert_shape(out["text_student"]["tokens"], (4, 77, 32))
  chex.assert_type(out["image_student"]["tokens"], jnp.bfloat16)
  np.testing.assert_array_equal(out["text_student"]["mask"].sum(1), [5, 7, 2, 72])


def test_tower_shapes():
  vit = ViT("tiny/8", embed_dim=16)
  out = vit.apply(vit.init(jax.random.key(0), _images(2)), _images(2))
  chex.assert_shape([out["cls"], out["tokens"], out["embedding"]], [(2, 32), (2, 16, 32), (2, 16)])
  text = TextTransformer("tiny", 16, vocab_size=VOCAB, eot_id=EOT)
  out = text.apply(text.init(jax.random.key(0), tokens([3, 4])), tokens([3, 4]))
  chex.assert_shape([out["embedding"], out["tokens"]], [(2, 16), (2, 77, 32)])


@pytest.mark.parametrize("module,shapes,low,high", [
    (ViT("Ti/16"), [((1, 224, 224, 3), jnp.float32)], 5.4e6, 5.6e6),        # + 0.19 M head = 5.7 M
    (ViT("B/32", 512), [((1, 224, 224, 3), jnp.float32)], 87.5e6, 88.5e6),
    (TextTransformer("B", 512), [((1, 77), jnp.int32)], 63.0e6, 63.8e6),
    (TextStudent("Ti"), [((1, 77), jnp.int32)], 14.6e6, 15.0e6),
])
def test_parameter_counts_at_paper_sizes(module, shapes, low, high):
  assert low < _abstract_count(module, *shapes) < high


def test_text_trunk_pools_at_the_first_end_of_text():
  text = TextTransformer("tiny", 16, vocab_size=VOCAB, eot_id=EOT, dtype=jnp.float32)
  toks = tokens([4, 6])
  params = text.init(jax.random.key(0), toks)
  embed = lambda t: text.apply(params, t)["embedding"]
  after = toks.at[:, 20:].set(17)                  # anything after the end-of-text token
  chex.assert_trees_all_equal(embed(toks), embed(after))
  before = toks.at[:, 2].set(42)
  assert not np.allclose(embed(toks), embed(before))


def test_text_student_ignores_padding():
  student = TextStudent("tiny", vocab_size=VOCAB, eot_id=EOT, dtype=jnp.float32)
  toks = tokens([4, 6])
  params = student.init(jax.random.key(0), toks)
  out, out_padded = (student.apply(params, t) for t in (toks, toks.at[:, 30:].set(17)))
  chex.assert_trees_all_close(out["cls"], out_padded["cls"], rtol=1e-6)
  mask = out["mask"][..., None]
  chex.assert_trees_all_close(out["tokens"] * mask, out_padded["tokens"] * mask, rtol=1e-6)


def test_students_off_gives_exactly_the_clip_towers():
  images, toks = _images(), tokens([3, 5, 1, 9])
  model = tiny_model(students="none")
  variables = model.init(jax.random.key(0), images, toks)
  assert set(variables["params"]) == {"image_tower", "text_tower", "logit_scale",
                                      "image_rank_head", "text_rank_head"}
  out = model.apply(variables, images, toks)
  vit, text = ViT("tiny/16", 16), TextTransformer("tiny", 16, vocab_size=VOCAB, eot_id=EOT)
  p = variables["params"]
  chex.assert_trees_all_equal(out["image"], normalise(
      vit.apply({"params": p["image_tower"]}, images)["embedding"]))
  chex.assert_trees_all_equal(out["text"], normalise(
      text.apply({"params": p["text_tower"]}, toks)["embedding"]))


def test_image_only_variant_fuses_the_image_side_alone():
  images, toks = _images(), tokens([3, 5, 1, 9])
  model = tiny_model(students="image")
  variables = model.init(jax.random.key(0), images, toks)
  assert "text_fusion" not in variables["params"] and "image_fusion" in variables["params"]
  out = model.apply(variables, images, toks)
  assert "text_gate" not in out and "image_gate" in out


def test_model_heads_drive_rank_losses():
  images, toks = _images(), tokens([3, 5, 1, 9])
  model = tiny_model(rank_order=3)
  variables = model.init(jax.random.key(0), images, toks)
  out = model.apply(variables, images, toks)
  image_head, text_head = list_heads(model, variables)
  got = rank_losses(out["image"], out["text"], out["scale"], image_head=image_head,
                    text_head=text_head, tie_key=jax.random.key(1))
  head = HighOrderPL(order=3, head_dim=8)
  p = variables["params"]
  expected = rank_losses(
      out["image"], out["text"], out["scale"], tie_key=jax.random.key(1),
      image_head=functools.partial(head.apply, {"params": p["image_rank_head"]}),
      text_head=functools.partial(head.apply, {"params": p["text_rank_head"]}))
  chex.assert_trees_all_close(got, expected, rtol=1e-6)


def test_logit_scale_is_clamped_at_100():
  images, toks = _images(), tokens([3, 5, 1, 9])
  model = tiny_model(students="none")
  variables = model.init(jax.random.key(0), images, toks)
  variables["params"]["logit_scale"] = jnp.float32(10.0)
  np.testing.assert_allclose(model.apply(variables, images, toks)["scale"], 100.0, rtol=1e-5)


def test_unknown_names_say_which_config_key():
  with pytest.raises(ValueError, match="config.model.image_trunk"):
    ViT("X/16").init(jax.random.key(0), _images(1))
  with pytest.raises(ValueError, match="config.model.students"):
    tiny_model(students="text").init(jax.random.key(0), _images(1), tokens([2]))
