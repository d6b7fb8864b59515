"""The XLA options the tests compile with.

Test programs are tiny and run a few steps, so most of a test's time is XLA
compiling them. `FAST_COMPILE`, XLA:CPU's backend at optimisation level 0
(LLVM's code generation without its optimisation passes), roughly halves
that (docs/performance.md § The test suite's time); `tests/conftest.py`
adds it to `XLA_FLAGS`, so every process a test starts inherits it. The
HLO passes (fusion, layout, sharding, memory analysis) are the same at
every level: only the machine code differs.

One thing does change: unoptimised reductions add their terms one by one,
where the optimised ones vectorise, so the float32 rounding of a sum of n
terms grows as n·ε rather than as log(n)·ε. The tests whose bounds were
derived for the trainer's arithmetic (one layout against another: sharded
against one device, FSDP, two processes against one) compile at the
trainer's level, `TRAINER` (XLA's default), and keep their tolerances. At
level 0 they fail: the sharded step's parameters move 3.8e-5 of a leaf's
norm from the one-device step's (bound 1e-5), and Adam turns the other
rounding of 2 × 4 devices into a loss 1e-3 away from 1 × 8 by step 4
(bound 2e-5).
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"
TRAINER = {"xla_backend_optimization_level": 3}      # XLA's default, the trainer's


def trainer_env(env: dict | None = None) -> dict:
  """`env` (default: this process's) with `FAST_COMPILE` taken out of
  `XLA_FLAGS`, for a subprocess that must compile as the trainer does."""
  env = dict(os.environ if env is None else env)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f != FAST_COMPILE)
  return env
