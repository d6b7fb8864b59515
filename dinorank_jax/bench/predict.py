"""A GPU run predicted before it is rented: `bench --suite predict`.

The paper's train step (`bench.step.SHAPES["gpu"]`, at the recipe's global
batch spread over `devices` GPUs) is compiled for a GPU target from this
machine (`bench.compile.Programs`, the `--suite compile --target` path), and
the optimised program is read (`bench.hlo`). Per device and step:

- compute: the model's FLOPs (`bench.flops`, checked against XLA's count on
  the CPU; XLA's cost analysis is not available for these executables) at
  the target's dense bf16 peak;
- memory: the bytes the program's instructions read and write in device
  memory (`hlo.read`), at the HBM bandwidth of the target file;
- communication: the bytes each collective sends (ring algorithm), over
  NVLink inside a node and, for groups that span nodes, hierarchically: a
  node's GPUs first combine over NVLink, then each sends its 1/g share over
  its own network port (rail-optimised, as NCCL does on DGX-class nodes).

The step cannot be faster than the slowest of the three (perfect overlap):
that is the lower bound, and the model's FLOPs over it the MFU ceiling. The
predicted step is the lower bound over `EFFICIENCY`, the fraction of it
real runs reach (derived in docs/performance.md § Predicting a GPU run;
replace it with the measured ratio once `launch/gpu_bench.sh` has run). From
it: samples/s, steps, hours and GPU-hours per CC3M epoch and for the
recipe's epochs, at 1, 8, 16 and 64 GPUs, and the CPU cores each GPU needs
to decode its samples at that rate.
"""

import dataclasses
import math

from dinorank_jax import aot, config as config_lib
from dinorank_jax.bench import flops
from dinorank_jax.bench.compile import Programs
from dinorank_jax.bench.hlo import read as read_hlo, ring_factor
from dinorank_jax.bench.step import PAPER_MS
from dinorank_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One GPU of a target and its node (bandwidths per GPU, each direction;
  the bf16 peak from `aot.BF16_TFLOPS`, HBM from the target file)."""
  target: str
  nvlink_gb_s: float
  fabric_gb_s: float          # the node's network, per GPU
  gpus_per_node: int
  cores_per_gpu: int
  source: str

  @property
  def bf16_tflops(self) -> float:        # dense
    return aot.BF16_TFLOPS[self.target]

  @property
  def hbm_bytes_s(self) -> float:
    return aot.memory_bandwidth(self.target)


HARDWARE = {
    "h100": Hardware("h100", 450, 50, 8, 14,
                     "NVIDIA H100 data sheet (SXM5: 989.4 dense bf16 TFLOP/s, NVLink 900 GB/s "
                     "both ways); DGX H100 guide (8 x ConnectX-7 400 Gb/s, 2 x 56 cores)"),
    "h200": Hardware("h200", 450, 50, 8, 14,
                     "NVIDIA H200 data sheet (SXM: 989.4 dense bf16 TFLOP/s, NVLink 900 GB/s "
                     "both ways); DGX H200 guide (8 x ConnectX-7 400 Gb/s, 2 x 56 cores)"),
    "a100": Hardware("a100", 300, 25, 8, 16,
                     "NVIDIA A100 data sheet (SXM4: 312 dense bf16 TFLOP/s, NVLink 600 GB/s "
                     "both ways); DGX A100 guide (8 x ConnectX-6 200 Gb/s, 2 x 64 cores)"),
}
# The fraction of the roofline bound a real step reaches: the paper's order-3
# step takes 379 ms on 8 H100s at 512 rows per device (Table 5), where this
# model's bound is 177 ms (memory; 2026-12-06, docs/performance.md §
# Predicting a GPU run), so 0.47. A calibration on one point, not a check:
# the other orders' ratios and `launch/gpu_bench.sh`'s measured step are.
EFFICIENCY = 0.47
# CC3M's released training split (Google's Conceptual Captions page); a
# download recovers 80-90 % of it: pass --records with the count you built.
CC3M_RECORDS = 3_318_333
# Samples/s one core decodes and crops through the input pipeline at the
# paper's shape (`bench.data`, one thread, 256 px records cropped to 224,
# CC3M-shaped teacher fields: 1,263-1,370 CPU µs a sample on this project's
# 2-core Xeon, 2026-12-06, docs/performance.md § The input pipeline's overhead).
DATA_SAMPLES_PER_CORE = 750
GPU_COUNTS = (1, 8, 16, 64)


def roofline(hardware: Hardware, model_flops: float, hbm_bytes: float,
             collectives: list[dict], devices: int) -> dict:
  """Seconds per step of compute, memory and communication, the bound (the
  slowest, all three overlapped), what bounds it and the MFU ceiling;
  `collectives` as `hlo.read` gives them."""
  g = min(devices, hardware.gpus_per_node)
  nvlink, fabric = hardware.nvlink_gb_s * 1e9, hardware.fabric_gb_s * 1e9
  comm = 0.0
  for c in collectives:
    if c["n"] <= g or c["op"] == "collective-permute":
      comm += c["sent_bytes"] / nvlink
    else:       # combined inside each node, then each GPU sends its 1/g share across nodes
      payload = c["payload_bytes"] * c["times"]
      comm += (ring_factor(c["op"], g) * payload / nvlink
               + ring_factor(c["op"], c["n"] // g) * payload / g / fabric)
  times = {"compute_s": model_flops / (hardware.bf16_tflops * 1e12),
           "memory_s": hbm_bytes / hardware.hbm_bytes_s, "communication_s": comm}
  bound = max(times.values())
  return {**times, "bound_s": bound, "bound_by": max(times, key=times.get).removesuffix("_s"),
          "mfu_ceiling": times["compute_s"] / bound}


def run_cost(step_s: float, batch: int, gpus: int, *, records: int, epochs: int,
             usd_per_gpu_hour: float | None = None) -> dict:
  """Steps, hours and GPU-hours of one epoch of `records` and of `epochs`."""
  steps = records // batch
  hours = steps * step_s / 3600
  out = {"steps_per_epoch": steps, "epoch_hours": hours, "epoch_gpu_hours": hours * gpus,
         "run_hours": hours * epochs, "run_gpu_hours": hours * gpus * epochs}
  if usd_per_gpu_hour is not None:
    out["run_usd"] = out["run_gpu_hours"] * usd_per_gpu_hour
  return out


def predict(target: str, gpus: int, *, order: int = 3, shape: str = "gpu",
            rows: int | None = None, overrides: dict | None = None,
            records: int = CC3M_RECORDS, epochs: int | None = None,
            usd_per_gpu_hour: float | None = None,
            data_rate: float = DATA_SAMPLES_PER_CORE) -> dict:
  """One column: the paper's order-`order` step (at `bench.step.SHAPES[shape]`,
  the recipe's global batch over `gpus`, or `rows` per GPU) compiled for
  `gpus` GPUs of `target`, read and set against the hardware, and what a
  run costs."""
  hardware, recipe = HARDWARE[target], config_lib.paper(order=order)
  batch, epochs = rows * gpus if rows else recipe.batch_size, epochs or recipe.epochs
  if batch % gpus:
    raise UserError(f"--gpus {gpus} does not divide the recipe's global batch of {batch}: "
                    "pass --rows (per GPU)")
  rows = batch // gpus
  programs = Programs(shape, target=target, devices=gpus, overrides=overrides)
  compiled, report = programs.step_executable(order, rows)
  model = programs.program(order)[0]
  model_flops = flops.train_step(model, programs.shape["image_size"], batch)["total"] / gpus
  moved = read_hlo(compiled.as_text(), gpus)
  names = programs.mesh.axis_names
  for c in moved["collectives"]:       # XLA's axis_i are the mesh's axes in order
    c["axes"] = (",".join(names) if c["n"] == gpus and not c["axes"].startswith("axis_") else
                 ",".join(names[int(a[5:])] if a.startswith("axis_") else a
                          for a in c["axes"].split(",")))
  bound = roofline(hardware, model_flops, moved["hbm_bytes"], moved["collectives"], gpus)
  step_s = bound["bound_s"] / EFFICIENCY
  per_gpu = rows / step_s
  by_axes = {}
  for c in moved["collectives"]:
    by_axes[c["axes"]] = by_axes.get(c["axes"], 0) + c["sent_bytes"]
  return {"target": target, "gpus": gpus, "nodes": math.ceil(gpus / hardware.gpus_per_node),
          "order": order, "rows_per_gpu": rows, "peak_bytes": report["peak_bytes"],
          "fits": report["fits"], "model_flops": model_flops, "hbm_bytes": moved["hbm_bytes"],
          "collective_bytes": by_axes, "collectives": len(moved["collectives"]),
          "unknown_trip_counts": moved["unknown_trip_counts"], **bound,
          "efficiency": EFFICIENCY, "step_s": step_s, "samples_s": batch / step_s,
          "paper_step_s": PAPER_MS[order] / 1000 if (target, gpus) == ("h100", 8) else None,
          "cores_per_gpu_needed": per_gpu / data_rate, "cores_per_gpu": hardware.cores_per_gpu,
          "data_bound": per_gpu / data_rate > hardware.cores_per_gpu,
          **run_cost(step_s, batch, gpus, records=records, epochs=epochs,
                     usd_per_gpu_hour=usd_per_gpu_hour), "epochs": epochs, "records": records}


def format_table(table: list[dict], title: str) -> str:
  """The prediction, one column per GPU count, then the sources."""
  gib, ms = lambda b: f"{b / 2 ** 30:.1f}", lambda s: f"{1000 * s:.0f}"
  rows = [
      ("order, GPUs (nodes)", lambda r: f"{r['order']}, {r['gpus']} ({r['nodes']})"),
      ("rows per GPU", lambda r: f"{r['rows_per_gpu']}"),
      ("peak GiB per GPU (fits at 75 %)", lambda r: f"{gib(r['peak_bytes'])} "
                                                    f"({'yes' if r['fits'] else 'no'})"),
      ("model TFLOP per GPU", lambda r: f"{r['model_flops'] / 1e12:.2f}"),
      ("HBM GiB read + written", lambda r: gib(r["hbm_bytes"])),
      ("collective GiB sent, by axes", lambda r: ", ".join(
          f"{axes} {gib(b)}" for axes, b in r["collective_bytes"].items()) or "none"),
      ("compute / memory / network ms", lambda r: f"{ms(r['compute_s'])} / {ms(r['memory_s'])}"
                                                  f" / {ms(r['communication_s'])}"),
      ("lower bound ms (bound by)", lambda r: f"{ms(r['bound_s'])} ({r['bound_by']})"),
      ("MFU ceiling", lambda r: f"{100 * r['mfu_ceiling']:.0f} %"),
      (f"predicted step ms (bound / {EFFICIENCY})", lambda r: ms(r["step_s"])
       + (f", paper {ms(r['paper_step_s'])}" if r["paper_step_s"] else "")),
      ("samples/s", lambda r: f"{r['samples_s']:,.0f}"),
      ("minutes per epoch", lambda r: f"{60 * r['epoch_hours']:.1f}"),
      ("GPU-hours per epoch", lambda r: f"{r['epoch_gpu_hours']:.1f}"),
      ("hours for the run", lambda r: f"{r['run_hours']:.1f}"),
      ("GPU-hours for the run", lambda r: f"{r['run_gpu_hours']:,.0f}"
                                          + (f" (${r['run_usd']:,.0f})" if "run_usd" in r else "")),
      ("decoding cores per GPU needed", lambda r: f"{r['cores_per_gpu_needed']:.1f} of "
                                                  f"{r['cores_per_gpu']}"
                                                  + (" DATA-BOUND" if r["data_bound"] else "")),
  ]
  first = table[0]
  lines = [title, f"{first['epochs']} epochs of {first['records']:,} records, global batch "
                  f"{first['rows_per_gpu'] * first['gpus']}"]
  lines += [f"{label:<42}" + "".join(f"{cell(r):>26}" for r in table) for label, cell in rows]
  hardware = HARDWARE[first["target"]]
  lines.append(f"{first['target']}: {hardware.source}; HBM {hardware.hbm_bytes_s / 1e12:.2f} "
               "TB/s (the target file)")
  for r in table:
    if r["data_bound"]:
      lines.append(f"warning: at {r['gpus']} GPUs the input pipeline, not the GPU, bounds the "
                   f"run: {r['cores_per_gpu_needed']:.1f} decoding cores per GPU needed, "
                   f"{r['cores_per_gpu']} on the node per GPU")
    if r["unknown_trip_counts"]:
      lines.append(f"note: {r['unknown_trip_counts']} loops of the {r['gpus']}-GPU program "
                   "have no known trip count; their collectives are counted once")
  return "\n".join(lines)
