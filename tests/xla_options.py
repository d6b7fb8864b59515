"""The XLA options the tests compile with.

Test programs are tiny and run a few steps, so most of a test's time is XLA
compiling them. `FAST_COMPILE` trades run time for compile time three ways
(docs/performance.md § The test suite's time); `tests/conftest.py` adds it
to `XLA_FLAGS`, so every process a test starts inherits it:

- XLA:CPU's backend at optimisation level 0: LLVM's code generation without
  its optimisation passes;
- XLA:CPU's older loop emitters instead of its fusion emitters, which spend
  longer in MLIR lowering than a test's program ever saves at run time;
- the program's LLVM module compiled whole instead of split into 32 parts
  for parallel code generation, which on 2 cores is overhead.

Measured on the tiny order-3 train step (8 virtual devices, 2 cores): the
backend compiles in 5.4 s against 9.2 s at level 0 alone and 13.0 s at
XLA's defaults; a step runs in 0.20 s against 0.17 s and 0.10 s. The HLO
passes (fusion decisions, layout, sharding, memory analysis) are the same:
only the machine code differs.

One thing does change: unoptimised reductions add their terms one by one,
where the optimised ones vectorise, so the float32 rounding of a sum of n
terms grows as n·ε rather than as log(n)·ε. The tests whose bounds were
derived for the trainer's arithmetic (one layout against another: sharded
against one device, FSDP, two processes against one) compile with
`TRAINER`, XLA's defaults, and keep their tolerances. At level 0 they fail:
the sharded step's parameters move 3.8e-5 of a leaf's norm from the
one-device step's (bound 1e-5), and Adam turns the other rounding of 2 × 4
devices into a loss 1e-3 away from 1 × 8 by step 4 (bound 2e-5).
"""

import os

FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                "--xla_cpu_parallel_codegen_split_count=1")
# XLA's defaults, the trainer's: compiler options that undo `FAST_COMPILE`.
TRAINER = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True,
           "xla_cpu_parallel_codegen_split_count": 32}


def trainer_env(env: dict | None = None) -> dict:
  """`env` (default: this process's) with `FAST_COMPILE` taken out of
  `XLA_FLAGS`, for a subprocess that must compile as the trainer does."""
  env = dict(os.environ if env is None else env)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if f not in FAST_COMPILE)
  return env
