"""Compiling for a GPU from this CPU machine (`dinorank_jax.aot`, `bench
--suite compile --target`), the fit search, and the trainer's refusal of a
step that cannot fit (`train.check_fits`)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dinorank_jax import aot, cuda_plugin, errors, train
from dinorank_jax.bench import __main__ as bench
from tests import tiny_corpus
from tests.tiny_config import get_config as tiny_config, lean_config

needs_plugin = pytest.mark.skipif(
    not aot.plugin_available(),
    reason=f"the gpu-aot extra is not installed, GPU-target compiles not tested: {aot.EXTRA}")
GIB = 2 ** 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mlp_report(devices, rows: int) -> dict:
  """`compile_ahead`'s report of a two-layer MLP's loss on `rows` rows per device."""
  from dinorank_jax import compilation
  mesh = Mesh(np.asarray(devices), ("data",))
  x = jax.ShapeDtypeStruct((rows * len(devices), 512), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P("data")))
  w = jax.ShapeDtypeStruct((512, 2048), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  loss = jax.jit(jax.grad(lambda w, x: jnp.sum(jax.nn.gelu(x @ w) @ w.T)))
  return compilation.compile_ahead(loss, w, x, compiler_options=aot.COMPILER_OPTIONS)[1]


@needs_plugin
def test_a_small_program_compiles_for_the_h100_with_exact_argument_bytes():
  devices = aot.devices("h100", 8)
  assert len(devices) == 8 and devices[0].device_kind == "NVIDIA H100 80GB HBM3"
  report = _mlp_report(devices, 64)
  assert report["argument_bytes"] == (64 * 512 + 512 * 2048) * 2     # bf16, per device
  assert report["output_bytes"] == 512 * 2048 * 2 and report["temp_bytes"] > 0
  assert report["peak_bytes"] == (report["argument_bytes"] + report["temp_bytes"]
                                  + report["output_bytes"] - report["alias_bytes"])
  fit = aot.fit_report(report, aot.device_memory("h100"))
  assert fit["device_bytes"] == 81559 * 2 ** 20 and fit["fits"] and fit["fits_at_0.95"]
  assert fit["usable_bytes"] == int(0.75 * 81559 * 2 ** 20)
  assert aot.device_memory("h200") == 143771 * 2 ** 20


@needs_plugin
@pytest.mark.skipif(cuda_plugin.driver_present(), reason="a CUDA driver is here: not a CPU machine")
def test_a_cpu_machine_with_the_plugin_starts_quietly_and_still_compiles_for_the_h100():
  """No JAX_PLATFORMS set: importing the trainer, starting JAX and compiling
  for an H100 write nothing to stderr, and JAX computes on the CPU."""
  code = ("import dinorank_jax.main, jax, jax.numpy as jnp\n"
          "from dinorank_jax import aot\n"
          "h100 = jax.sharding.SingleDeviceSharding(aot.devices('h100', 1)[0])\n"
          "compiled = jax.jit(jnp.sin).lower(\n"
          "    jax.ShapeDtypeStruct((8,), jnp.float32, sharding=h100)).compile()\n"
          "print(jax.devices()[0].platform, compiled.memory_analysis().output_size_in_bytes)")
  env = {k: v for k, v in os.environ.items()   # nor the run's cache: a GPU program is not
         if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "JAX_COMPILATION_CACHE_DIR")}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
  assert out.returncode == 0 and out.stderr == "", out.stderr[-3000:]
  assert out.stdout == "cpu 32\n"


@needs_plugin
def test_fit_search_equals_a_brute_force_scan_of_real_h100_compiles():
  devices = aot.devices("h100", 8)
  peaks = {rows: _mlp_report(devices, rows)["peak_bytes"] for rows in range(64, 1025, 64)}
  assert all(a < b for a, b in zip(list(peaks.values()), list(peaks.values())[1:]))
  for limit in (peaks[64] - 1, peaks[320] + 1, peaks[576], peaks[1024]):
    best, tried = aot.largest_fitting(lambda r: _mlp_report(devices, r)["peak_bytes"], limit)
    brute = max((r for r, p in peaks.items() if p <= limit), default=None)
    assert best == brute, (limit, tried)
    assert {r: peaks[r] for r in tried} == tried and len(tried) <= 6


def test_fit_search_bisects_with_at_most_six_peaks():
  calls = []

  def peak_at(rows):
    calls.append(rows)
    return rows * 10
  assert aot.largest_fitting(peak_at, 10 * 1024) == (1024, {1024: 10240})
  calls.clear()
  best, tried = aot.largest_fitting(peak_at, 10 * 700)
  assert best == 640 and len(tried) <= 6 and calls[:2] == [1024, 64]
  assert aot.largest_fitting(peak_at, 10 * 63)[0] is None


def test_without_the_plugin_a_target_compile_names_the_extra(monkeypatch):
  monkeypatch.setattr(aot, "plugin_available", lambda: False)
  with pytest.raises(aot.MissingPlugin) as e:
    aot.devices("h100")
  assert errors.one_line(e.value) == (
      "compiling for --target h100 needs JAX's CUDA plugin: pip install "
      "'dinorank_jax[gpu-aot]'")
  with pytest.raises(errors.UserError, match="one of"):
    aot.target_config("v100")


def _report(args_gib, temp_gib):
  return {"argument_bytes": int(args_gib * GIB), "temp_bytes": int(temp_gib * GIB),
          "output_bytes": int(args_gib * GIB), "alias_bytes": int(args_gib * GIB),
          "peak_bytes": int((args_gib + temp_gib) * GIB)}


def test_the_refusal_names_peak_limit_and_settings_that_fit():
  config = tiny_config("/nowhere")
  config.batch_size, config.optim.accum_steps = 4096, 1
  report = _report(2, 8)                           # 10 GiB; 6 GiB leaves half the temporaries
  train.check_fits(report, 10 * GIB, config, devices=8, device_kind="GPU")   # fits: silent
  with pytest.raises(train.StepDoesNotFit) as e:
    train.check_fits(report, 6 * GIB, config, devices=8, device_kind="NVIDIA H100 80GB HBM3",
                     remat_peaks=[("dots", int(7 * GIB)), ("full", int(5 * GIB))])
  assert errors.one_line(e.value) == str(e.value) == (
      "the train step needs 10.0 GiB per device (arguments 2.0 GiB, temporaries 8.0 GiB), "
      "more than the 6.0 GiB JAX may use on NVIDIA H100 80GB HBM3 (config.device_memory_gib "
      "or XLA_PYTHON_CLIENT_MEM_FRACTION): it would fit with --config.model.remat=full "
      "(5.0 GiB) or --config.batch_size=2048 or --config.optim.accum_steps=2 (batch size and "
      "accumulation steps estimated from the temporaries)")
  with pytest.raises(train.StepDoesNotFit, match="alone do not fit: shard them with "
                                                 "--config.mesh.fsdp"):
    train.check_fits(report, 1 * GIB, config, devices=8, device_kind="GPU")


@needs_plugin
@pytest.mark.slow
def test_bench_compiles_the_train_step_for_h100_with_xla_attention_and_refuses_it(
    tmp_path, capsys):
  """Slow: one train step compiled by XLA:GPU for 8 H100s at the CPU shape, without the students
  (the path is the trainer's for any model)."""
  with pytest.raises(SystemExit, match="attention=cudnn cannot be compiled for a --target"):
    bench.main(["--suite", "compile", "--target", "h100", "--device", "cpu",
                "--model", "attention=cudnn"])
  out = tmp_path / "compile.json"
  bench.main(["--suite", "compile", "--target", "h100", "--device", "cpu", "--orders", "0",
              "--model", "attention=xla,students=none", "--no_compilation_cache",
              "--json", str(out)])
  printed = capsys.readouterr().out
  assert "compile (cpu shape, 8 x h100" in printed and "usable 59.7 GiB" in printed
  results = json.loads(out.read_text())
  assert results["device"] == "cpu"    # nothing of this machine's but its CPU
  step = {r["program"]: r for r in results["compile"]}["step order 0"]
  assert step["fits"] and 0 < step["peak_bytes"] < GIB
  # The trainer's check on that compiled step, for an H100 offering less.
  config = tiny_config("/nowhere")
  with pytest.raises(train.StepDoesNotFit, match=r"GiB JAX may use on NVIDIA H100 80GB HBM3 "
                                                 r".*: it would fit with --config.batch_size="):
    train.check_fits(step, step["peak_bytes"] // 2, config, devices=8,
                     device_kind=aot.devices("h100", 1)[0].device_kind)


@needs_plugin
@pytest.mark.slow
def test_bench_fit_writes_the_largest_rows_of_each_policy(tmp_path, capsys):
  """Slow: the fit search compiles the train step for the H200; one policy, one order and no
  students keep it to one small compile."""
  out = tmp_path / "fit.json"
  bench.main(["--suite", "compile", "--target", "h200", "--device", "cpu", "--fit",
              "--orders", "0", "--model", "remat=full,students=none", "--no_compilation_cache",
              "--json", str(out)])
  assert "largest rows per device that fit (cpu shape, 8 x h200)" in capsys.readouterr().out
  (row,) = json.loads(out.read_text())["fit"]
  assert row["remat"] == "full" and row["order"] == 0 and row["largest_rows"] == 1024
  assert list(row["peaks"]) == ["1024"] and row["limit_bytes"] == int(0.75 * 143771 * 2 ** 20)


@pytest.mark.slow
def test_the_trainer_refuses_a_step_over_its_budget_before_running_it(tmp_path):
  """Slow: the refusal comes after the trainer compiles its step and the coarser remat policies'."""
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=64)
  config = lean_config(root)
  config.model.remat, config.device_memory_gib = "dots", 1e-6    # only "full" is coarser
  with pytest.raises(train.StepDoesNotFit) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = errors.one_line(e.value)
  assert message.startswith("the train step needs ")
  assert "more than the 0.0 GiB JAX may use on cpu" in message
  assert message.endswith("the parameters and optimiser state alone do not fit: shard them "
                          "with --config.mesh.fsdp")
  assert not (tmp_path / "run" / "checkpoints").exists() or not any(
      (tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.slow
def test_gpu_bench_script_runs_end_to_end_at_a_tiny_shape(tmp_path):
  """With the plugin, the measured peak has the H200's AOT prediction beside
  it; without, `TARGET=` leaves that out and the rest still runs. The model
  without its students (`MODEL`): the script's path is the same for any model.
  With the plugin, the order-3 step's predicted time for as many H200s is written
  beside the measured one (`bench --suite predict`). Slow: the script's
  processes, two H200 compiles among them, at 4 rows."""
  target = "h200" if aot.plugin_available() else ""
  out = tmp_path / "out"
  env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "ROWS": "4", "ORDERS": "0,3",
         "SUITES": "step", "ROUNDS": "1", "REPEATS": "1", "AB": "attention=xla,xla_gpu_enable_latency_hiding_scheduler=true",
         "LOSS_SIZES": "8x64", "MODEL": "students=none", "PYTHON": sys.executable,
         "TARGET": target}
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_bench.sh")], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "backend cpu" in (out / "versions.txt").read_text()
  memory = json.loads((out / "memory.json").read_text())["memory"]
  assert memory["predicted_peak_bytes"] > 0 and memory["measured_peak_bytes"] is None
  assert memory["model"] == {"students": "none"}
  assert memory.get("target") == (target or None)
  assert not target or memory["target_peak_bytes"] > 0
  steps = {r["model"]: r for r in json.loads((out / "gpu.json").read_text())["step"]}
  assert set(steps) == {"order 0", "order 3",
                        "order 3 [attention=xla,xla_gpu_enable_latency_hiding_scheduler=true]"}
  assert (out / "losses.json").exists()
  if target:
    predicted, = json.loads((out / "predict.json").read_text())["predict"]
    assert (predicted["gpus"], predicted["rows_per_gpu"], predicted["order"]) == (
        steps["order 3"]["devices"], 4, 3)
    assert predicted["step_s"] == predicted["bound_s"] / predicted["efficiency"] > 0
    for label in ("lower bound ms", "MFU ceiling", "GPU-hours for the run", "decoding cores"):
      assert label in (out / "predict.log").read_text(), label
    assert "measured efficiency" in (out / "predicted_vs_measured.txt").read_text()
