"""Memory of the exact high-order loss: O(rows · chunk · M), not O(rows · M²)."""

from dinorank_jax.bench.losses import measure


def _exact_order3_gib(rows, m):
  return measure("order 3 exact", 3, None, rows, m, time_it=False)["temp_gib"]


def test_memory_grows_linearly_in_list_length():
  small, large = _exact_order3_gib(64, 1024), _exact_order3_gib(64, 4096)
  # 4x the items: linear scaling gives 4x; materialising rows × M × M gives 16x.
  assert 3.0 < large / small < 5.0, (small, large)


def test_exact_order3_fits_one_device_share_of_the_paper_batch():
  # rows = 512, M = 4096: one GPU's rows of the 4096 batch on 8 GPUs.
  assert _exact_order3_gib(512, 4096) < 2.0
