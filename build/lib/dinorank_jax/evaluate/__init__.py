"""Evaluation: `evaluate` (the held-out check the trainer runs, `heldout`)
and the evaluation tool for exported models, `python -m dinorank_jax.evaluate`
(`suites`, `metrics`, `probe`, `sources`, `prompts`, `report`)."""

from dinorank_jax.evaluate.heldout import evaluate, sharded_map

__all__ = ["evaluate", "sharded_map"]
