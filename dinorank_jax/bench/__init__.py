"""The benchmarks (`python -m dinorank_jax.bench`, `bench.data`, `bench.losses`,
`bench.build`); docs/performance.md has what they measured."""


def against(value: float, target: float, places: int = 2) -> str:
  """`value` printed beside its `target`: to `places` decimals, or to as many
  more as it takes not to print as the target when it differs from it, so a
  verdict never reads `1.26 … paper 1.26 MISSED`."""
  while places < 6 and value != target and round(value, places) == round(target, places):
    places += 1
  return f"{value:.{places}f}"
