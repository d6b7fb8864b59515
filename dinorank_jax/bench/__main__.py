"""One benchmark command.

    python -m dinorank_jax.bench --suite all                      # CPU, reduced size
    python -m dinorank_jax.bench --suite step,mfu --device gpu    # the paper's shape
    python -m dinorank_jax.bench --suite step --profile /tmp/trace
    python -m dinorank_jax.bench --suite compile --device gpu      # compile cost, any backend
    python -m dinorank_jax.bench --suite compile --target h100     # for 8 H100s, from any machine
    python -m dinorank_jax.bench --suite compile --target h100 --fit --json fit.json
    python -m dinorank_jax.bench --suite predict --target h100 --gpus 8,64  # time and cost

Suites (comma-separated, or `all`):

* `compile`: tracing, lowering and compiling the initialiser and the train
  step at orders 0 and 3 from abstract shapes: equations, seconds, memory
  (`bench.compile`); `--breakdown` adds the order-3 step's equations by part
  and each part's program compiled alone; with `--target h100|h200|a100`, compiled for `--devices`
  GPUs of that kind from any machine (the `gpu-aot` extra), each program's
  peak per device set against the GPU's memory; `--fit` then searches the
  largest rows per device that fit, for every remat policy;
* `predict`: the recipe's step compiled for `--gpus` GPUs of `--target`
  from any machine and read: FLOPs, HBM bytes and collective bytes per GPU,
  the roofline bound, the predicted step time, samples/s, hours and
  GPU-hours per CC3M epoch and for the run, and the decoding cores each GPU
  needs (`bench.predict`);
* `memory`: the order-3 step alone, XLA's predicted peak per device against
  the allocator's measured peak (GPU) and, with `--target`, the peak
  predicted for that target from abstract shapes (run it in its own process:
  the measured peak is the process's);
* `step`: the full train step at orders 0–5, each as a ratio to order 0
  measured in the same process, next to the paper's Table 5; `--ab` adds the
  order-3 step under each variant (`attention=cudnn`, `remat=dots`, an XLA
  flag such as `xla_gpu_enable_latency_hiding_scheduler=true`, or several
  joined by commas), timed in the same rounds;
* `mfu`: model FLOPs utilisation of CLIP (no students, order 0) and of the
  full order-3 model (`bench.step`, `bench.flops`);
* `rank`: the exact order-3 loss as rows and M grow: time, temporaries and
  fitted exponents (`bench.losses.scaling`);
* `data`: the input pipeline against a bare decode loop (`bench.data`);
* `build`: the webdataset builder at 1×, 4× and 16× a synthetic corpus: peak
  resident memory and pairs/s against a bare decode-and-re-encode loop
  (`bench.build`).

`--device` picks the shape (`bench.step.SHAPES`; `gpu` with `--target`) and
checks the backend (`--suite compile` alone compiles the gpu shape on any
backend);
`--model scan=false,remat=dots` overrides `config.model` fields of every
model (an A/B in two calls; `compilation_cache` flags as in `main`);
`--profile DIR` writes a JAX profiler trace of three order-3 steps
(docs/performance.md says how to open it); `--json FILE` writes every number,
rewritten as each suite finishes (a run cut short keeps what it measured).
"""

import argparse
import json
import os
import time

import jax

from dinorank_jax import aot, compilation, errors
from dinorank_jax.bench import compile as compile_suite
from dinorank_jax.bench import build, data, losses, predict, step
from dinorank_jax.models.layers import REMAT_POLICIES

SUITES = ("compile", "memory", "step", "mfu", "rank", "data", "build", "predict")


def model_overrides(text: str) -> dict:
  """`"scan=false,remat=dots"` -> `{"scan": False, "remat": "dots"}`."""
  try:
    fields, options = step.variant(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"--model: {e}") from None
  if options:
    raise argparse.ArgumentTypeError(f"--model takes config.model fields; XLA flags "
                                     f"{sorted(options)} go in --ab")
  return fields


def parse(argv=None):
  p = errors.ArgumentParser(prog="python -m dinorank_jax.bench",
                            description=__doc__.split("\n")[0])
  p.add_argument("--suite", default="all", help=f"'all' or a comma list of {SUITES}")
  p.add_argument("--device", choices=sorted(step.SHAPES),
                 help="the shape: cpu (default) or gpu (the paper's; default with --target)")
  p.add_argument("--orders", help="rank orders (default: 0-5 for the step suite, 0,3 for "
                 "the compile suite)")
  p.add_argument("--target", choices=aot.TARGETS, help="compile suite: compile for this GPU "
                 "from any machine (the gpu-aot extra); memory suite: its predicted peak "
                 "beside the measured one")
  p.add_argument("--devices", type=int, default=8, help="with --target: GPUs in the mesh")
  p.add_argument("--gpus", default=",".join(map(str, predict.GPU_COUNTS)),
                 help="predict suite: GPU counts, one column each")
  p.add_argument("--records", type=int, default=predict.CC3M_RECORDS,
                 help="predict suite: records an epoch reads (default: CC3M's training split)")
  p.add_argument("--epochs", type=int, help="predict suite: epochs (default: the recipe's 64)")
  p.add_argument("--usd_per_gpu_hour", type=float, help="predict suite: price of a GPU-hour")
  p.add_argument("--data_rate", type=float, default=predict.DATA_SAMPLES_PER_CORE,
                 help="predict suite: samples/s one core decodes (bench.data on your hosts)")
  p.add_argument("--ab", action="append", default=[], metavar="VARIANT",
                 help="step suite: also time the order-3 step under VARIANT, e.g. "
                 "attention=cudnn or xla_gpu_enable_latency_hiding_scheduler=true (repeatable)")
  p.add_argument("--fit", action="store_true", help="with --target: the largest rows per "
                 "device that fit, for every remat policy (or the --model remat)")
  p.add_argument("--breakdown", action="store_true", help="compile suite: also the order-3 "
                 "step's equations by part (towers, students, fusion, each loss, optimiser) "
                 "and each part compiled alone")
  p.add_argument("--rows", type=int, help="rows per device (default: the shape's)")
  p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per round")
  p.add_argument("--peak_tflops", type=float, help="per-device peak for MFU (default: "
                 "the vendor's dense bf16 figure for known GPUs)")
  p.add_argument("--data_records", type=int, default=512, help="data suite: records")
  p.add_argument("--build_pairs", type=int, default=2048, help="build suite: pairs at 1x")
  p.add_argument("--build_scales", default="1,4,16", help="build suite: corpus multiples")
  p.add_argument("--build_workers", type=int, help="build suite: workers (default: all cores)")
  p.add_argument("--profile", help="write a profiler trace of three order-3 steps here")
  p.add_argument("--json", help="also write every number to this file")
  p.add_argument("--model", type=model_overrides, default={},
                 help="config.model overrides for every model, e.g. scan=false,remat=dots")
  compilation.add_cache_flags(p)
  args = p.parse_args(argv)
  args.suites = SUITES if args.suite == "all" else tuple(args.suite.split(","))
  unknown = set(args.suites) - set(SUITES)
  if unknown:
    p.error(f"unknown suite(s) {sorted(unknown)}: use 'all' or some of {SUITES}")
  if args.target and args.suites not in (("compile",), ("memory",), ("predict",)):
    p.error("--target goes with --suite compile, memory or predict alone")
  if "predict" in args.suites and (args.suites != ("predict",) or not args.target):
    p.error("--suite predict goes alone, with --target h100|h200|a100")
  if args.fit and args.suites != ("compile",):
    p.error("--fit goes with --suite compile alone")
  if args.fit and not args.target:
    p.error("--fit needs --target h100|h200|a100")
  if args.breakdown and (args.suites != ("compile",) or args.target):
    p.error("--breakdown goes with --suite compile alone, without --target")
  args.device = args.device or ("gpu" if args.target else "cpu")
  for text in args.ab:
    try:
      step.variant(text)
    except ValueError as e:
      p.error(f"--ab: {e}")
  return args


def orders(text: str | None, default: str) -> tuple[int, ...]:
  return tuple(int(r) for r in (text or default).split(","))


@errors.guard
def main(argv=None):
  args = parse(argv)
  if args.suites in (("compile",), ("predict",)) and args.target:
    jax.config.update("jax_platforms", "cpu")   # the target's topology: no GPU here is used
  compilation.use_cache_from_flags(args)
  if (args.device == "gpu" and jax.default_backend() != "gpu"
      and set(args.suites) not in ({"compile"}, {"predict"})):
    raise SystemExit(f"--device gpu, but JAX's backend is {jax.default_backend()}: install "
                     "jax[cuda12] on a GPU machine, or use --device cpu")
  device = jax.devices()[0]
  print(f"{jax.device_count()} x {device.device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPU cores, JAX {jax.__version__}")
  results, started = {"device": device.device_kind, "devices": jax.device_count()}, time.time()

  def save():
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
  where = f", {args.devices} x {args.target}" if args.target else ""
  if args.fit:
    policies = (args.model["remat"],) if "remat" in args.model else tuple(REMAT_POLICIES)
    results["fit"] = compile_suite.fit(args.device, args.target,
                                       orders=orders(args.orders, "0,3"), policies=policies,
                                       devices=args.devices, overrides=args.model)
    print(compile_suite.format_fit(results["fit"], f"\nlargest rows per device that fit "
                                   f"({args.device} shape{where})"))
  elif "predict" in args.suites:
    results["predict"] = []
    for order in orders(args.orders, "3"):
      for gpus in orders(args.gpus, ""):
        results["predict"].append(predict.predict(
            args.target, gpus, order=order, shape=args.device, rows=args.rows,
            overrides=args.model,
            records=args.records, epochs=args.epochs, usd_per_gpu_hour=args.usd_per_gpu_hour,
            data_rate=args.data_rate))
        save()
    print(predict.format_table(results["predict"], f"\npredicted run on {args.target} "
                               f"({args.model or 'default model'})"))
  elif "compile" in args.suites:
    results["compile"] = compile_suite.run(args.device, orders=orders(args.orders, "0,3"),
                                           rows=args.rows, overrides=args.model,
                                           target=args.target, devices=args.devices)
    print(compile_suite.format_table(results["compile"], f"\ncompile ({args.device} shape"
                                     f"{where}, {args.model or 'default model'})"))
    if args.breakdown:
      save()
      results["breakdown"] = compile_suite.breakdown(args.device)
      print(compile_suite.format_breakdown(results["breakdown"], f"\nthe order-3 step by part "
                                           f"({args.device} shape)"))
  save()
  if "memory" in args.suites:
    results["memory"] = memory = step.measure_memory(args.device, rows=args.rows,
                                                     overrides=args.model)
    save()
    if args.target:
      memory["target"] = args.target
      try:    # the GPU's measurement is kept whatever befalls the prediction
        programs = compile_suite.Programs(args.device, target=args.target,
                                          devices=memory["devices"], overrides=args.model)
        memory["target_peak_bytes"] = programs.compile_step(3, memory["rows"])["peak_bytes"]
      except Exception as e:     # noqa: BLE001 (reported, not swallowed)
        memory["target_peak_bytes"], memory["target_error"] = None, f"{type(e).__name__}: {e}"
        print(f"the {args.target} prediction failed: {memory['target_error']}")
    print("\n" + step.format_memory(memory))
    save()
  models = {}
  if "step" in args.suites:
    models |= step.order_models(orders(args.orders, "0,1,2,3,4,5"))
    models |= step.variant_models(args.ab)
  if "mfu" in args.suites or args.profile:
    models |= step.MFU_MODELS
  if models:
    table = step.measure(models, args.device, rows=args.rows, rounds=args.rounds,
                         repeats=args.repeats, peak=args.peak_tflops,
                         profile=("order 3", args.profile) if args.profile else None,
                         overrides=args.model)
    rows = {r["model"]: r for r in table}
    if "step" in args.suites:
      results["step"] = step.add_order_ratios([r for r in table if r["model"].startswith("order")])
      save()
      print(step.format_table(results["step"], f"\nstep cost by order ({args.device} shape, "
                              f"{table[0]['rows']} rows x {table[0]['devices']} devices)"))
    if "mfu" in args.suites:
      results["mfu"] = [rows[label] for label in step.MFU_MODELS]
      print(step.format_table(results["mfu"], "\nmodel FLOPs utilisation"))
      save()
  if "rank" in args.suites:
    results["rank"] = losses.scaling(repeats=args.repeats)
    print("\n" + losses.format_scaling(results["rank"]))
    save()
  if "data" in args.suites:
    results["data"] = data.run(num_records=args.data_records, rounds=args.rounds)
    print(data.format_table(results["data"], f"\ninput pipeline ({args.data_records} records "
                                             "at 256 px, crops to 224 px)"))
    save()
  if "build" in args.suites:
    results["build"] = build.run(pairs=args.build_pairs, workers=args.build_workers,
                                 scales=tuple(int(s) for s in args.build_scales.split(",")))
    print(build.format_table(results["build"], f"\nwebdataset build ({results['build']['workers']}"
                                               " workers, 384 px JPEGs stored at 256 px)"))
  if args.profile:
    print(f"\nprofile of three order-3 steps: {args.profile} (docs/performance.md)")
  print(f"\ntotal {time.time() - started:.0f} s")
  save()


if __name__ == "__main__":
  main()
