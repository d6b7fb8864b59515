"""The trainer: configs, the non-finite guard, resume after SIGKILL and
SIGTERM, and 2 processes × 4 devices against 1 × 8 (the loop's outputs and
evaluations are test_train_loop.py's)."""

import functools
import glob
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dinorank_jax import compilation, metric_writer, parallel, train
from dinorank_jax.config import default_compilation_cache
from dinorank_jax.data import records
from dinorank_jax.losses.distill import CRITERIA
from dinorank_jax.models.fusion import FUSION_MODES
from dinorank_jax.step import Objective
from tests import tiny_corpus
from tests.tiny_config import CONFIGS, LEAN_FLAGS, lean_config
from tests.xla_options import FAST_COMPILE, trainer_env

ROOT = os.path.dirname(CONFIGS)
LAUNCH_CPU = os.path.join(ROOT, "launch", "multiprocess_cpu.sh")
CONFIG_ARGS = {"r0": [None], "r1": [None], "r2": [None], "r3": [None], "r4": [None],
               "r5": [None], "clip": [None], "rankclip": [None], "demo": [None],
               "cyclip": [None, "demo"], "alip": [None, "demo"],
               "table3b": ["clip", "rankclip", "high_order", "image_distill", "image_text",
                           "full"],
               "table4": [f"criterion_{c}" for c in CRITERIA]
                         + [f"fusion_{f}" for f in FUSION_MODES],
               "subset": ["1m", "2m"]}
META = {"vocab_size": 100, "eot_id": 99,
        "teacher": {"pca_dim": 8, "cls_dim": 10, "text_dim": 6}}


# Subprocesses inherit the run's compilation cache (tests/conftest.py): a
# launch reads what an earlier test or launch compiled.
ENV = {**os.environ, "PYTHON": sys.executable}


def _main(workdir, *flags, env=ENV):
  command = [sys.executable, "-m", "dinorank_jax.main", f"--workdir={workdir}", *flags]
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _saved_params(workdir, step):
  """The parameters saved at `step`, as NumPy, whatever mesh wrote them."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata)
  return [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target)["params"])]


def test_every_config_loads_and_builds():
  assert sorted(CONFIG_ARGS) == sorted(os.path.basename(p)[:-3]
                                       for p in glob.glob(os.path.join(CONFIGS, "*.py")))
  for name, args in CONFIG_ARGS.items():
    module = runpy.run_path(os.path.join(CONFIGS, f"{name}.py"))
    assert f"python -m dinorank_jax.main --config configs/{name}.py" in module["__doc__"]
    for arg in args:
      c = module["get_config"](arg)
      Objective(**c.objective.to_dict())
      assert c.model.fusion_mode in FUSION_MODES and c.objective.criterion in CRITERIA
      # The experiment's structure at the tiny widths (trunk sizes are checked
      # by the model tests at the paper's widths).
      c.model.update(image_trunk="tiny/16", text_trunk="tiny", image_student="tiny/8",
                     text_student="tiny", embed_dim=16, rank_head_dim=8)
      model = train.build_model(c, META)
      jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3)),
                     np.zeros((1, 77), np.int32))
  with pytest.raises(ValueError, match="configs/table4.py:fusion_full"):
    runpy.run_path(os.path.join(CONFIGS, "table4.py"))["get_config"](None)


def test_r3_without_data_names_the_flag(tmp_path):
  proc = _main(tmp_path / "run", "--config=configs/r3.py")
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 1
  assert out.strip().splitlines()[-1] == (
      "error: config.data.path is not set: set --config.data.path to a records directory "
      "with teacher features (docs/data.md: dinorank_jax.data.build, then "
      "dinorank_jax.teacher.export)")
  proc = _main(tmp_path / "run", "--config=configs/r3.py:/nowhere")
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 1 and "config.data.path=/nowhere holds no dataset" in out


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_step_terms_and_checkpoint(tmp_path):
  """Slow: four starts of the trainer; skipping non-finite updates is a program of its own."""
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=64)
  workdir = str(tmp_path / "run")
  config = lean_config(root)
  config.epochs, config.data.eval_path = 4, ""     # 8 steps, checkpoint at 8
  train.train_and_evaluate(config, workdir)
  config.epochs = 8
  config.optim.lr = 1e30                           # diverges within a step or two
  with pytest.raises(train.NonFiniteLoss, match=r"non-finite loss at step (8|9|10) \(terms: "
                     r".*loss.*\); resume from checkpoint 8 with a lower config.optim.lr"):
    train.train_and_evaluate(config, workdir)
  config.on_nonfinite = "skip"          # the same run, updates skipped: it finishes
  train.train_and_evaluate(config, workdir)
  assert all(np.isfinite(x).all() for x in _saved_params(workdir, 16))
  # Poisoned teacher features are a data error, skipped and counted, not a loss.
  poisoned = tiny_corpus.corpora(str(tmp_path / "poisoned"), num_train=64, poison=True)
  with pytest.raises(records.DataError, match="records of .* are bad"):
    train.train_and_evaluate(lean_config(poisoned), str(tmp_path / "poisoned_run"))


@pytest.mark.slow
def test_resuming_with_more_epochs_reads_the_step_from_the_cache(tmp_path):
  # The schedule is an argument of the step, not a constant of it: a finished
  # run resumed with more epochs, another warm-up and learning rate compiles
  # nothing new (a cache of its own, so no other test's program can answer).
  """Slow: two starts with a cache of their own, so the first compiles cold."""
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=64)
  workdir = str(tmp_path / "run")
  config = lean_config(root)
  config.epochs, config.data.eval_path = 2, ""
  config.compilation_cache = str(tmp_path / "cache")
  compilation.use_cache(config.compilation_cache)
  try:
    train.train_and_evaluate(config, workdir)
    config.epochs, config.optim.warmup_steps, config.optim.lr = 5, 6, 1e-3
    train.train_and_evaluate(config, workdir)
  finally:
    compilation.use_cache(default_compilation_cache())
  compiles = [m["compile/from_cache"] for m in metric_writer.read(workdir)
              if "compile/from_cache" in m]
  assert compiles == [0.0, 1.0]
  steps = [m["step"] for m in metric_writer.read(workdir) if "loss" in m]
  assert steps == list(range(1, 11))
  lr = {m["step"]: m["lr"] for m in metric_writer.read(workdir) if "lr" in m}
  assert lr[10] < lr[7] and abs(lr[7] - 1e-3) < 1e-9     # lr(6): the new run's peak


def _wait_for(predicate, proc, timeout=400):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() < deadline
    time.sleep(0.2)


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_is_bit_exact(tmp_path):
  """Slow: four launches of the trainer; 36 steps leave room to kill after a checkpoint and stop
  before the end. About 75 steps in all, so they compile at the trainer's optimisation
  level, where a step runs in half the time (tests/xla_options.py)."""
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=128)
  flags = ("--config=tests/tiny_config.py:" + root, *LEAN_FLAGS, "--config.epochs=9",  # 36 steps
           "--config.checkpoint.every=16", "--config.data.eval_path=")
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  start = functools.partial(_main, env=trainer_env(ENV))
  proc = start(straight, *flags)
  assert proc.wait(timeout=600) == 0, proc.communicate()[0][-3000:]

  proc = start(resumed, *flags)
  saved = lambda step: os.path.isdir(os.path.join(resumed, "checkpoints", str(step)))
  _wait_for(lambda: saved(16), proc)
  proc.send_signal(signal.SIGKILL)                      # no chance to save or clean up
  proc.wait()
  killed_at = max(m["step"] for m in metric_writer.read(resumed))
  proc = start(resumed, *flags)                         # resumes from 16
  _wait_for(lambda: max(m["step"] for m in metric_writer.read(resumed)) >= killed_at + 6, proc)
  proc.send_signal(signal.SIGTERM)                      # preemption: save, then exit
  assert proc.wait(timeout=300) == 0
  steps = sorted(int(s) for s in os.listdir(os.path.join(resumed, "checkpoints")))
  assert steps[-1] > killed_at and steps[-1] % 16      # the SIGTERM save
  proc = start(resumed, *flags)
  assert proc.wait(timeout=600) == 0, proc.communicate()[0][-3000:]

  # Every step's loss after the resume equals the straight run's: same batches.
  first = {m["step"]: m["loss"] for m in metric_writer.read(straight) if "loss" in m}
  for m in metric_writer.read(resumed):
    if "loss" in m:                                   # not the compile rows of each start
      assert m["loss"] == first[m["step"]], m["step"]
  for a, b in zip(_saved_params(straight, 36), _saved_params(resumed, 36)):
    np.testing.assert_array_equal(a, b)                 # bit-exact on CPU


@pytest.mark.slow
def test_ctrl_c_saves_the_step_under_way_and_says_so_in_one_line(tmp_path):
  """Ctrl-C (SIGINT) mid-run: the step under way ends and is saved, and the
  command exits 130 with one `interrupted:` line naming that checkpoint, no
  traceback. Resuming from a save outside the schedule is the SIGTERM test's.
  Slow (about 12 s, a trainer process): with the other signal tests, outside
  the fast loop, whose 5 minutes have no room left."""
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=64)
  workdir = str(tmp_path / "run")
  proc = _main(workdir, "--config=tests/tiny_config.py:" + root, *LEAN_FLAGS,
               "--config.epochs=100", "--config.checkpoint.every=1000",          # 200 steps
               "--config.data.eval_path=")
  _wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl"))
            and any("loss" in m for m in metric_writer.read(workdir)), proc)
  proc.send_signal(signal.SIGINT)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 130, out[-3000:]
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert len(saved) == 1 and 0 < saved[0] < 200
  assert [line for line in out.splitlines() if line.startswith("interrupted:")] == [
      f"interrupted: saved step {saved[0]} of 200 in {workdir}/checkpoints; run the same "
      "command to resume"]
  assert "Traceback" not in out, out[-3000:]
  # The start is a short summary; the whole parameter table is in the workdir.
  assert "parameters: " in out and f"every one in {workdir}/parameters.txt)" in out
  assert "image_trunk/" not in out and "writing to " + workdir in out
  with open(os.path.join(workdir, "parameters.txt")) as f:
    rows = f.read().splitlines()
  assert rows[0].split() == ["name", "shape", "count"] and rows[-1].startswith("total")


@pytest.mark.slow
def test_two_processes_of_four_devices_equal_one_of_eight_and_resume_on_any_count(tmp_path):
  """2 × 4 devices against 1 × 8, step for step; then the 2 × 4 run resumed
  from its step-1 checkpoint in one process of 8 devices, and that run
  resumed from its step 2 on 2 × 4 again, continues the same global batches
  (the data positions of 2 processes made global for 1, and of 1 divided
  among 2): every step equals the straight 1 × 8 run.
  Slow: four launches of the trainer at its optimisation level (two of them of two
  processes, the second reading the first's step from the cache)."""
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=96)
  # 3 steps, a checkpoint after each; the learning rate is at its peak from step 2.
  flags = ("--config=tests/tiny_config.py:" + root, *LEAN_FLAGS, "--config.epochs=1",
           "--config.checkpoint.every=1", "--config.optim.warmup_steps=1")
  # Compiled as the trainer compiles (XLA's default options), for which the
  # tolerances below hold: at level 0 Adam turns the other rounding of 2 x 4
  # into a loss 1e-3 away by step 4.
  env = trainer_env(ENV)
  single = str(tmp_path / "single")
  proc = _main(single, *flags, env=env)
  assert proc.wait(timeout=600) == 0, proc.communicate()[0][-3000:]
  multi = str(tmp_path / "multi")
  # The single run's cache: process 0 loads the step from it while process 1
  # (which never writes the cache) compiles it, so their first collective
  # waits on `parallel.wait_for_all` rather than timing out in gloo.
  proc = subprocess.run(["bash", LAUNCH_CPU, "2", "4", f"--workdir={multi}", *flags],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  one, two = metric_writer.read(single), metric_writer.read(multi)
  assert [m["step"] for m in one] == [m["step"] for m in two]
  # Gloo's narrow send buffers (`parallel.GlooSendBuffers`) hold every step to
  # 12 s or more, waiting with the cores idle, so load cannot hide them; widened,
  # the steps after the first take 1-3 s alone and 2-7 s beside the suite.
  assert min(m["step_seconds"] for m in two if "step_seconds" in m and m["step"] > 1) < 9
  _assert_same_steps(one, two)
  # Adam turns float noise in near-zero gradients into steps of up to lr (2e-3)
  # over the 2 updates; 1e-4 is far below what a missed cross-process reduction gives.
  for a, b in zip(_saved_params(single, 3), _saved_params(multi, 3)):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)

  # Checkpoint 1 was written by 2 processes, checkpoint 2 (after the first
  # resume) by 1.
  for keep, writers, processes, devices in ((1, 2, 1, 8), (2, 1, 2, 4)):
    for step in os.listdir(os.path.join(multi, "checkpoints")):
      if int(step) > keep:
        shutil.rmtree(os.path.join(multi, "checkpoints", step))
    if processes == 1:          # a plain start: one process needs no coordinator
      proc = _main(multi, *flags, env=env)
      out = proc.communicate(timeout=600)[0]
    else:
      proc = subprocess.run(["bash", LAUNCH_CPU, str(processes), str(devices),
                             f"--workdir={multi}", *flags],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
      out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert (f"checkpoint {keep} holds the data positions of {writers} processes; "
            f"resumed on {processes} at global batch {keep}") in out
    rows = metric_writer.read(multi)
    resumed = rows[max(i for i, m in enumerate(rows) if "compile/equations" in m) + 1:]
    assert [m["step"] for m in resumed if "loss" in m] == list(range(keep + 1, 4))
    _assert_same_steps([m for m in one if m["step"] > keep], resumed)


def _assert_same_steps(expected, got):
  for a, b in zip(expected, got):
    assert a["step"] == b["step"]
    for key in ("loss", "clip", "rank_cross", "distill_image", "distill_text",
                "retrieval/i2t_r1", "zero_shot/colour"):
      if key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=2e-5, err_msg=f"{key} at {a['step']}")


def _free_port() -> int:
  with socket.socket() as free:
    free.bind(("localhost", 0))
    return free.getsockname()[1]


def _job(workdir, count, *flags):
  """`count` processes of one device each, joined on a free localhost port
  (as launch/multiprocess_cpu.sh starts them, without its stopping the rest
  when one fails: here the survivors must stop themselves)."""
  port = _free_port()
  env = {**ENV, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": " ".join(("--xla_force_host_platform_device_count=1", *FAST_COMPILE))}
  return [subprocess.Popen(
      [sys.executable, "-m", "dinorank_jax.main", f"--workdir={workdir}",
       f"--coordinator_address=localhost:{port}", f"--num_processes={count}",
       f"--process_id={i}", *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(count)]


@pytest.mark.slow
def test_a_killed_process_ends_the_job_in_seconds_naming_the_checkpoint(tmp_path):
  """kill -9 of one process: the other stops within 30 s with one line naming
  the lost process and the last complete checkpoint, instead of waiting on
  the coordination service's 100 s and aborting with a C++ stack; the job
  resumes from that checkpoint.
  Slow: two two-process jobs; the first must outlive a checkpoint before one process is killed,
  and the survivor waits out the 20 s of silence."""
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=64)    # 2 steps an epoch
  flags = ("--config=tests/tiny_config.py:" + root, *LEAN_FLAGS, "--config.checkpoint.every=4",
           "--config.data.eval_path=")
  run = str(tmp_path / "run")
  first, second = _job(run, 2, *flags, "--config.epochs=100")
  # Orbax renames a checkpoint's directory to its step once every process has written it.
  _wait_for(lambda: os.path.isdir(os.path.join(run, "checkpoints", "4")), first, timeout=600)
  second.send_signal(signal.SIGKILL)
  killed = time.monotonic()
  out = first.communicate(timeout=120)[0]
  assert time.monotonic() - killed < 30 and first.returncode == 1, out[-3000:]
  last = out.strip().splitlines()[-1]
  found = re.fullmatch(r"error: process 1 of the job's 2 stopped answering for 20 s \(killed, or "
                       r"its host lost\): process 0 stops too; start the job again to resume "
                       r"from checkpoint (\d+) in (.*)", last)
  assert found and found[2] == os.path.join(run, "checkpoints"), last
  step = int(found[1])
  assert step >= 4 and step % 4 == 0
  # That checkpoint is complete: the job resumes from it and finishes (two steps more).
  job = _job(run, 2, *flags, f"--config.epochs={step // 2 + 1}")
  outs = [proc.communicate(timeout=600)[0] for proc in job]
  assert [proc.returncode for proc in job] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert f"resumed from step {step}" in outs[0]


_LOST_PEER = """
import os, sys, time
import jax
from jax._src import distributed
from dinorank_jax import parallel
me, port, checkpoints = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", 2, me)
jax.devices()
parallel.PeerWatch(distributed.global_state.client, checkpoints, timeout=3)
if me == 1:
  time.sleep(2)
  os._exit(9)
sys.exit("error: the main thread ends first")
"""


def test_a_lost_peer_is_named_even_after_the_main_thread_has_ended(tmp_path):
  """The main thread of a process may end (an error of its own) before the
  watch sees that another process is gone. JAX's exit handler then drops the
  backend and waits on the dead process (100 s, then an abort): the watch
  must still say which process was lost and end this one, without starting
  JAX again."""
  os.makedirs(tmp_path / "checkpoints" / "8")
  port = str(_free_port())
  env = {**ENV, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", _LOST_PEER, str(i), port,
                             str(tmp_path / "checkpoints")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  started = time.monotonic()
  try:
    out = procs[0].communicate(timeout=60)[0]
  finally:
    for proc in procs:
      proc.kill()
      proc.communicate()
  assert procs[0].returncode == 1 and time.monotonic() - started < 40, out[-3000:]
  assert out.strip().splitlines()[-1] == (
      "error: process 1 of the job's 2 stopped answering for 3 s (killed, or its host lost): "
      f"process 0 stops too; start the job again to resume from checkpoint 8 in "
      f"{tmp_path / 'checkpoints'}"), out[-3000:]


def test_narrow_send_buffers_are_widened_and_the_connection_still_carries_data():
  """Gloo narrows a connection's send buffer to its first small message, as
  here; `widen_send_buffers` finds every narrower TCP socket of the process
  and gives it `SEND_BUFFER_BYTES` (Linux reports twice what is set)."""
  with socket.create_server(("localhost", 0)) as server:
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    with client, peer:
      client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2096)
      assert client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < parallel.SEND_BUFFER_BYTES
      assert parallel.widen_send_buffers() >= 1
      for sock in (client, peer):
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= parallel.SEND_BUFFER_BYTES
      message = os.urandom(1 << 20)
      client.sendall(message)         # fits the widened buffer: returns before any read
      received = bytearray()
      while len(received) < len(message):
        received += peer.recv(1 << 20)
      assert received == message
  assert parallel.widen_gloo_send_buffers() is None     # one process, no gloo


def test_multiprocess_launcher_returns_a_failed_process_status():
  proc = subprocess.run(["bash", LAUNCH_CPU, "2", "1"], env={**os.environ, "PYTHON": "false"},
                        capture_output=True, timeout=60)
  assert proc.returncode == 1
