"""PCA of teacher patch tokens (NumPy, float64), fitted once on a sample."""

import numpy as np


def fit_pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """`(mean [C], components [k, C])`, `k = min(dim, C)`, rows orthonormal,
  ordered by decreasing variance; from the exact covariance eigendecomposition.

  Args:
    x: samples `[S, C]`.
  """
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0)
  centred = x - mean
  cov = centred.T @ centred / max(len(x) - 1, 1)
  values, vectors = np.linalg.eigh(cov)
  order = np.argsort(values)[::-1][:min(dim, x.shape[1])]
  return mean, vectors[:, order].T


def project(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
  """`[..., C]` -> `[..., k]`."""
  return (np.asarray(x, np.float64) - mean) @ components.T
