"""Parameter counts of each part, at the paper's sizes by default.

    python -m dinorank_jax.models.summary

Shapes come from `jax.eval_shape`, so nothing is allocated.
"""


import jax
import jax.numpy as jnp
import numpy as np

from dinorank_jax import errors
from dinorank_jax.models.dinorankclip import DinoRankCLIP
from dinorank_jax.models.text import CONTEXT_LENGTH


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def parameter_overview(params) -> str:
  """A table of every parameter: path, shape and count, then the total."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
  width = max(map(len, names), default=4)
  lines = [f"{'name':<{width}}  {'shape':<20}{'count':>12}"]
  for name, (_, x) in zip(names, leaves):
    lines.append(f"{name:<{width}}  {str(tuple(x.shape)):<20}{int(np.prod(x.shape)):>12,}")
  lines.append(f"{'total':<{width}}  {'':<20}{count(params):>12,}")
  return "\n".join(lines)


def abstract_params(model: DinoRankCLIP, image_size: int = 224, batch: int = 2):
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((batch, CONTEXT_LENGTH), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]


def parameter_table(model: DinoRankCLIP, image_size: int = 224) -> list[tuple[str, int]]:
  """`(part, count)` for each top-level part of the model, then the total."""
  params = abstract_params(model, image_size)
  rows = [(name, count(sub)) for name, sub in params.items()]
  return rows + [("total", count(params))]


@errors.guard
def main(argv=None):
  parser = errors.ArgumentParser(prog="python -m dinorank_jax.models.summary",
                                 description=__doc__.split("\n")[0])
  parser.add_argument("--rank_order", type=int, default=3, help="the rank order R")
  parser.add_argument("--students", default="both", help="both, image, text or none")
  args = parser.parse_args(argv)
  model = DinoRankCLIP(rank_order=args.rank_order, students=args.students)
  print(f"DinoRankCLIP at the paper's sizes (ViT-B/32 + text B, students Ti/16 + Ti, "
        f"order {args.rank_order}, 224 px):")
  for name, n in parameter_table(model):
    print(f"  {name:<20}{n / 1e6:>9.2f} M")


if __name__ == "__main__":
  main()
