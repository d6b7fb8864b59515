"""Linear probes: L2-regularised multinomial logistic regression on frozen
image embeddings, the protocol of CLIP (Radford et al. 2021, appendix A.3).

The loss is `mean cross-entropy + λ/2 ‖W‖²` (the bias is not regularised),
minimised by full-batch L-BFGS (`optax.lbfgs`, jitted) until the
gradient's L2 norm falls below `TOL` (10^-5), or for at most `steps`
iterations. CLIP's probes stopped the same way (scikit-learn's tolerance).
Past that point an iteration changes the probe by float32 rounding alone,
and costs more line-search evaluations than the ones before (on the demo's
120-class probe, 3.2 per iteration over the last 100 of 200 against 1.2
over the first 50); strongly regularised fits reach the tolerance within
8-23 iterations. λ is chosen on the validation split: a sweep over
10^-7 … 10^2 (one value per decade, strong to weak, each fit warm-started
from the last; CLIP's range of scikit-learn's C, 10^-6 … 10^6, is λ = 1/(C n)
for n training examples) and then quarter decades around the best. Among
equally good values the middle one is taken (a tie at the edge of a plateau
is the least stable choice). The probe is refitted on train + validation
with that λ and scored on the test split.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dinorank_jax.evaluate.metrics import check_embeddings

COARSE = tuple(10.0 ** e for e in range(-7, 3))
FINE = (10 ** -0.5, 10 ** -0.25, 10 ** 0.25, 10 ** 0.5)
TOL = 1e-5      # L-BFGS stops once the gradient's L2 norm is below this


def _loss(params, x, y, l2):
  logits = x @ params["w"] + params["b"]
  nll = jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  return jnp.mean(nll) + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames="steps")
def _fit(params, x, y, l2, steps):
  loss = functools.partial(_loss, x=x, y=y, l2=l2)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def going(carry):
    count = optax.tree_utils.tree_get(carry[1], "count")
    grad = optax.tree_utils.tree_get(carry[1], "grad")     # at the current parameters
    return (count == 0) | ((count < steps) & (optax.tree_utils.tree_norm(grad) >= TOL))

  params, state = jax.lax.while_loop(going, step, (params, opt.init(params)))
  return params, optax.tree_utils.tree_get(state, "count")


def fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, *, init=None,
        steps: int = 200) -> tuple[dict, int]:
  """The probe's `{"w": [D, C], "b": [C]}` on features `x` and labels `y`, and
  the L-BFGS iterations it took (at most `steps`)."""
  if init is None:
    init = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
  params, count = _fit(init, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32),
                       jnp.float32(l2), steps)
  return params, int(count)


def predict(params: dict, x: np.ndarray) -> np.ndarray:
  return np.asarray(jnp.argmax(jnp.asarray(x, jnp.float32) @ params["w"] + params["b"], axis=1))


def accuracy(params: dict, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
  """Top-1 accuracy and mean per-class recall."""
  hit = predict(params, x) == y
  return {"top1": float(hit.mean()),
          "mean_per_class_recall": float(np.mean([hit[y == c].mean() for c in np.unique(y)]))}


def _middle_of_best(scores: dict[float, float]) -> float:
  tied = sorted(l2 for l2, s in scores.items() if s == max(scores.values()))
  return tied[len(tied) // 2]


def linear_probe(train: tuple, val: tuple, test: tuple, num_classes: int, *,
                 steps: int = 200) -> dict[str, float]:
  """`(features, labels)` splits -> test `top1`, `mean_per_class_recall`, the chosen
  `l2`, its validation `val_top1` and the final fit's L-BFGS `iterations`."""
  for (x, _), split in zip((train, val, test), ("train", "val", "test")):
    check_embeddings(x, f"probe {split}")
  scores, params = {}, None
  for l2 in COARSE[::-1]:                        # strong to weak: warm starts stay stable
    params, _ = fit(*train, num_classes, l2, init=params, steps=steps)
    scores[l2] = accuracy(params, *val)["top1"]
  best = _middle_of_best(scores)
  for l2 in (best * f for f in FINE):
    scores[l2] = accuracy(fit(*train, num_classes, l2, steps=steps)[0], *val)["top1"]
  best = _middle_of_best(scores)
  joined = tuple(np.concatenate([a, b]) for a, b in zip(train, val))
  final, iterations = fit(*joined, num_classes, best, steps=steps)
  return {**accuracy(final, *test), "l2": float(best), "val_top1": scores[best],
          "iterations": iterations}
