"""Prompt ensembles and class names for zero-shot classification.

ImageNet's 80 prompt templates and 1,000 class names are those of OpenAI's
CLIP prompt-engineering notebook. They are read, like CLIP's BPE vocabulary,
from the data module the open_clip_torch wheel ships
(`open_clip/zero_shot_metadata.py`, plain tuples that import nothing),
loaded on its own so that neither the open_clip package nor torch is
imported. TFDS labels ImageNet-derived sets with WordNet ids in the order
of its `imagenet2012/labels.txt`; `class_names` maps those ids to CLIP's
names. Other datasets use their own label names, with `_` read as a space.
"""

import functools
import importlib.util
import os

import numpy as np

from dinorank_jax.data.tokenizer import open_clip_file

# The synthetic corpus's captions are short noun phrases.
SYNTHETIC_TEMPLATES = ("a {c}", "a picture of a {c}")


@functools.cache
def _open_clip_metadata():
  spec = importlib.util.spec_from_file_location(
      "_open_clip_zero_shot_metadata", open_clip_file("zero_shot_metadata.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def imagenet_templates() -> tuple[str, ...]:
  """CLIP's 80 ImageNet prompt templates, as `str.format` patterns with `{c}`."""
  return tuple(t("{c}") for t in _open_clip_metadata().OPENAI_IMAGENET_TEMPLATES)


def imagenet_class_names() -> tuple[str, ...]:
  """CLIP's 1,000 ImageNet class names, in label order."""
  return tuple(_open_clip_metadata().IMAGENET_CLASSNAMES)


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
  """The 1,000 WordNet ids in ImageNet label order (from the tensorflow-datasets package)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
  with open(path) as f:
    return tuple(line.strip() for line in f if line.strip())


def class_names(labels: list[str]) -> list[str]:
  """Readable names for a dataset's label names: CLIP's for ImageNet WordNet ids."""
  if labels and all(n.startswith("n") and n[1:].isdigit() for n in labels):
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    names = imagenet_class_names()
    return [names[index[w]] for w in labels]
  return [n.replace("_", " ") for n in labels]


def class_embeddings(encode_text, names, templates) -> np.ndarray:
  """`[C, D]` unit rows: each class's mean normalised prompt embedding,
  renormalised. A template names its class as `{c}`, as often as it likes
  (`template.format(c=name)`, CLIP_benchmark's rule; a blank template is an
  empty prompt, as there)."""
  prompts = [t.format(c=n) for n in names for t in templates]
  x = np.asarray(encode_text(prompts), np.float32).reshape(len(names), len(templates), -1)
  x = x.mean(axis=1)
  return x / np.linalg.norm(x, axis=1, keepdims=True)
