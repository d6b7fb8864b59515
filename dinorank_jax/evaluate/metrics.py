"""The numbers of the evaluation, from embeddings (NumPy; no model inside).

Ranks are pessimistic: a query's positive is placed after every other
candidate whose score is greater *or equal*, so a tie with a wrong candidate
is never a win (a constant model scores chance at best, never 100 %). A query
with several positives is a hit at k when any of them is among its first k
(the other positives do not count against it). Embeddings that are not
finite or have zero norm are an error (`InvalidEmbeddings`), never a score.

* `zero_shot`: top-k accuracy and mean per-class recall.
* `zero_shot_chance`, `retrieval_chance`: what a random ranking scores on
  average, printed beside each number.
* `retrieval`: image→text and text→image recall@k with any number of
  captions per image (MSCOCO has five).
* `modality_gap`: Liang et al.'s gap (the distance between the image and
  the text centroid) and the cone numbers: the mean cosine between two
  different embeddings of one modality (how narrow each cone is), between
  any image and any text, and between matched pairs.
* `gram_fidelity`: per image, the cosine between the student's and the
  teacher's patch Gram matrices (`losses.distill.gram_matrix`, so any
  criterion is comparable whatever its widths) and the Gram distance the
  `gram_rel` loss minimises, `‖G_s − G_t‖_F² / n`.
"""

import math

import numpy as np

from dinorank_jax.errors import UserError
from dinorank_jax.losses.distill import gram_matrix

CHUNK = 2048
TIES = ("pessimistic: a candidate scoring equal to the positive counts as ranked before it "
        "(CLIP_benchmark's torch.topk breaks such ties arbitrarily)")


class InvalidEmbeddings(UserError, ValueError):
  """Embeddings that cannot be scored; the message says how many and which."""


def check_embeddings(x: np.ndarray, what: str) -> None:
  """Raises `InvalidEmbeddings` unless every row of `x` is finite and nonzero."""
  x = np.asarray(x)
  nonfinite = ~np.all(np.isfinite(x), axis=1)
  zero = ~nonfinite & ~np.any(x != 0, axis=1)
  if nonfinite.any() or zero.any():
    raise InvalidEmbeddings(
        f"{nonfinite.sum() + zero.sum()} of {len(x)} {what} embeddings are unusable "
        f"({nonfinite.sum()} not finite, {zero.sum()} zero): the model diverged or its "
        "export is damaged")


def positions(scores: np.ndarray, columns: np.ndarray) -> np.ndarray:
  """`[n]`: the place of column `columns[i]` in row i, counting every other
  column with a score `>=` its own (ties pessimistic)."""
  s = np.take_along_axis(scores, columns[:, None], axis=1)
  before = (scores >= s) & (np.arange(scores.shape[1]) != columns[:, None])
  return before.sum(axis=1)


def _best_positive_place(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
  """`[n]`: the place of each row's best positive among its negatives (ties
  pessimistic; `positive` a bool mask)."""
  best = np.max(np.where(positive, scores, -np.inf), axis=1, keepdims=True)
  return np.sum(~positive & (scores >= best), axis=1)


def zero_shot(image: np.ndarray, classes: np.ndarray, labels: np.ndarray,
              ks=(1, 3, 5)) -> dict[str, float]:
  """`top{k}` accuracy and `mean_per_class_recall` (top-1) of `image @ classes.T`."""
  check_embeddings(image, "image")
  check_embeddings(classes, "class")
  ks = [k for k in ks if k <= len(classes)]
  place = np.concatenate([positions(image[s:s + CHUNK] @ classes.T, labels[s:s + CHUNK])
                          for s in range(0, len(image), CHUNK)])
  out = {f"top{k}": float(np.mean(place < k)) for k in ks}
  present = np.unique(labels)
  out["mean_per_class_recall"] = float(np.mean([np.mean(place[labels == c] == 0)
                                                for c in present]))
  return out


def retrieval(image: np.ndarray, text: np.ndarray, text_image: np.ndarray,
              ks=(1, 5, 10)) -> dict[str, float]:
  """`i2t_r{k}`, `t2i_r{k}`; caption j describes image `text_image[j]`."""
  check_embeddings(image, "image")
  check_embeddings(text, "text")
  i2t, t2i = [], []
  for s in range(0, len(image), CHUNK):
    scores = image[s:s + CHUNK] @ text.T
    positive = text_image[None, :] == np.arange(s, s + len(scores))[:, None]
    i2t.append(_best_positive_place(scores, positive))
  for s in range(0, len(text), CHUNK):
    t2i.append(positions(text[s:s + CHUNK] @ image.T, text_image[s:s + CHUNK]))
  i2t, t2i = np.concatenate(i2t), np.concatenate(t2i)
  return {**{f"i2t_r{k}": float(np.mean(i2t < k)) for k in ks},
          **{f"t2i_r{k}": float(np.mean(t2i < k)) for k in ks}}


def zero_shot_chance(num_classes: int, ks=(1, 3, 5)) -> dict[str, float]:
  """A random ranking of `num_classes` classes: top-k is `k / C`."""
  out = {f"top{k}": k / num_classes for k in ks if k <= num_classes}
  out["mean_per_class_recall"] = 1 / num_classes
  return out


def retrieval_chance(captions_per_image, ks=(1, 5, 10)) -> dict[str, float]:
  """A random ranking: a caption finds its one image among `N` in the first k
  with chance `k / N`; image i finds one of its `m_i` captions among all `T`
  with chance `1 − C(T − m_i, k) / C(T, k)`, averaged over the images."""
  m = np.asarray(captions_per_image, np.int64)
  total, n = int(m.sum()), len(m)
  miss = lambda m_i, k: math.prod((total - m_i - j) / (total - j) for j in range(min(k, total)))
  return {**{f"i2t_r{k}": float(np.mean([1 - miss(int(m_i), k) for m_i in m])) for k in ks},
          **{f"t2i_r{k}": min(k / n, 1.0) for k in ks}}


def _cone(x: np.ndarray) -> float:
  """Mean cosine over ordered pairs of different unit rows (O(N D), exact)."""
  total = x.sum(axis=0)
  n = len(x)
  return float((total @ total - np.sum(x * x)) / (n * (n - 1)))


def modality_gap(image: np.ndarray, text: np.ndarray) -> dict[str, float]:
  """Gap and cone numbers of matched unit embeddings `[N, D]` (row i of each a pair)."""
  check_embeddings(image, "image")
  check_embeddings(text, "text")
  image, text = image.astype(np.float64), text.astype(np.float64)
  ci, ct = image.mean(axis=0), text.mean(axis=0)
  return {"gap": float(np.linalg.norm(ci - ct)),
          "cone_image": _cone(image), "cone_text": _cone(text),
          "cross_cosine": float(ci @ ct),
          "matched_cosine": float(np.mean(np.sum(image * text, axis=1)))}


def projection_2d(image: np.ndarray, text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both clouds on the first two principal axes of their union (for the gap picture)."""
  both = np.concatenate([image, text]).astype(np.float64)
  centred = both - both.mean(axis=0)
  axes = np.linalg.svd(centred, full_matrices=False)[2][:2]
  xy = centred @ axes.T
  return xy[:len(image)], xy[len(image):]


def gram_fidelity(student: np.ndarray, teacher: np.ndarray) -> dict[str, np.ndarray]:
  """Per image: `cosine` and `distance` of aligned token sets `[B, n, c_s]`, `[B, n, c_t]`."""
  gs, gt = np.asarray(gram_matrix(student)), np.asarray(gram_matrix(teacher))
  dot = np.sum(gs * gt, axis=(1, 2))
  cosine = dot / (np.linalg.norm(gs, axis=(1, 2)) * np.linalg.norm(gt, axis=(1, 2)))
  distance = np.sum((gs - gt) ** 2, axis=(1, 2)) / student.shape[1]
  return {"cosine": cosine, "distance": distance}
