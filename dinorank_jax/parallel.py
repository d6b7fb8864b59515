"""The one place that builds device meshes, places the train state and turns
host batches into global arrays.

The mesh has two axes, `data` × `fsdp`, over every device of every host.
The batch (the rows of every loss) is sharded over both; parameters and
optimiser state are replicated over `data` and, when `fsdp > 1`, sharded over
`fsdp` (ZeRO-3 style: XLA gathers each weight where it is used). With the
default `fsdp = 1` this is plain data parallelism.

`wait_for_all` lines the processes up before a program's first collective;
`watch_peers` ends every process of a job within seconds when one is gone;
`widen_gloo_send_buffers` keeps CPU jobs of several processes from stalling
in gloo.
"""

import os
import socket
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
# A compile can take long on a big model; a barrier that gives up sooner than
# that would end a healthy run.
BARRIER_SECONDS = 3600
BATCH = (DATA, FSDP)    # the axes the batch is sharded over; the losses' axis_name


def make_mesh(devices=None, fsdp: int = 1) -> Mesh:
  """A `data` × `fsdp` mesh over `devices` (default: every device of every host).

  Axis types stay `Auto` so `jax.jit` propagates shardings and `shard_map`
  accepts inputs placed by `global_batch` without an explicit reshard.
  """
  devices = jax.devices() if devices is None else devices
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"config.mesh.fsdp={fsdp} must divide the {len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(-1, fsdp), BATCH)


def state_shardings(tree, mesh: Mesh):
  """Shardings of a (possibly abstract) state tree: each leaf's largest
  dimension that the `fsdp` size divides is sharded over `fsdp`; the rest,
  and every leaf when `fsdp = 1`, is replicated. Depends only on shapes, so
  parameters and their Adam moments are placed alike."""
  size = mesh.shape[FSDP]

  def place(leaf):
    spec = [None] * len(leaf.shape)
    if size > 1:
      dims = [d for d in np.argsort(leaf.shape)[::-1] if leaf.shape[d] % size == 0]
      if dims and leaf.shape[dims[0]] >= size:
        spec[dims[0]] = FSDP
    return NamedSharding(mesh, P(*spec))
  return jax.tree.map(place, tree)


def global_batch(mesh: Mesh, local: dict) -> dict:
  """This process's NumPy batch `[b, ...]` -> global arrays `[b · processes, ...]`
  sharded over `BATCH` (the one place batches cross into JAX)."""
  sharding = NamedSharding(mesh, P(BATCH))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def wait_for_all(name: str, seconds: int = BARRIER_SECONDS) -> None:
  """Every process waits here until all have arrived (nothing with one process).

  Call it between compiling a program and running it. Processes finish
  compiling at different times: only process 0 writes the persistent
  compilation cache, so on a rerun it loads the step in seconds while the
  others compile it anew, and the first collective of the step then waits for
  them under the collectives' own short deadline (30 s for CPU gloo), which
  fails the run. This barrier goes through the coordination service, not
  through a device collective, so it waits `seconds`. `name` must be unique
  per call site and run.
  """
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=seconds * 1000)


# Silence after which another process of the job counts as gone. The
# coordination service's own deadline is 100 s, and ends in an abort with a
# C++ stack; a collective with a dead peer waits up to that long, a commit
# barrier of a checkpoint too.
PEER_TIMEOUT_SECONDS = 20
_BEAT_SECONDS = 1
_DONE = "done"


class PeerWatch:
  """A daemon thread that publishes this process's heartbeat through the
  coordination service's key-value store every second and reads the
  others'. When another process has been silent for `timeout` seconds
  (killed, its host lost) or the coordinator stops answering, it prints one
  line naming the lost process and the last complete checkpoint under
  `checkpoints`, and exits the process with status 1 at once, wherever the
  main thread is blocked (a collective, a checkpoint's commit barrier).
  `finish()` marks this process as done, so that the others, still
  finishing, do not take its exit for a loss."""

  def __init__(self, client, checkpoints: str, timeout: float = PEER_TIMEOUT_SECONDS):
    self.client, self.checkpoints, self.timeout = client, checkpoints, timeout
    self.me, self.count = jax.process_index(), jax.process_count()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)
    self._thread.start()

  def _key(self, process: int) -> str:
    return f"dinorank_jax/alive/{process}"

  def _run(self):
    start = reached = time.monotonic()
    seen = {p: (None, start) for p in range(self.count) if p != self.me}
    beat = 0
    while not self._stop.wait(_BEAT_SECONDS):
      now, beat = time.monotonic(), beat + 1
      try:
        self.client.key_value_set(self._key(self.me), str(beat), allow_overwrite=True)
        reached = now
      except Exception:  # the coordinator is gone (process 0, or its host)
        if now - reached > self.timeout:
          self._lost("the coordinator (process 0)")
        continue
      for process, (value, since) in list(seen.items()):
        try:
          current = self.client.key_value_try_get(self._key(process))
        except Exception:  # not published yet
          current = None
        if current == _DONE:
          del seen[process]
        elif current != value:
          seen[process] = (current, now)
        elif now - since > self.timeout:
          self._lost(f"process {process}")

  def _lost(self, who: str):
    stop_job(f"{who} of the job's {self.count} stopped answering for {self.timeout:.0f} s",
             self.checkpoints, self.me)

  def verdict(self) -> None:
    """Waits long enough for the watch to notice a lost process (it then ends
    this one); returns when none is lost. For the main thread after a
    runtime error in a collective or barrier: gloo fails at once when a peer
    dies ("Connection reset by peer"), before the watch has seen the silence."""
    time.sleep(self.timeout + 8 * _BEAT_SECONDS)    # room for a watch slowed by a busy host

  def finish(self):
    """Marks this process done (the others stop watching it) and stops the thread."""
    self._stop.set()
    self._thread.join()
    try:
      self.client.key_value_set(self._key(self.me), _DONE, allow_overwrite=True)
    except Exception:  # the coordinator is gone: nothing left to tell
      pass


def stop_job(what: str, checkpoints: str, me: int) -> None:
  """Ends this process, number `me` of the job, at once with one line: `what`
  happened to another process, and the last complete checkpoint under
  `checkpoints` to resume from (a step directory orbax has committed; one
  being written has a temporary name).

  It calls nothing in JAX: the main thread may be exiting already, and
  JAX's exit handler has then dropped the backend, which a call such as
  `jax.process_index()` would start again, waiting on the dead process."""
  steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit()] if os.path.isdir(
      checkpoints) else []
  resume = (f"start the job again to resume from checkpoint {max(steps)} in {checkpoints}"
            if steps else "no checkpoint was written yet: start the job again")
  # Starts a line of its own: the progress bar leaves the cursor mid-line.
  sys.stderr.write(f"\nerror: {what} (killed, or its host lost): process {me} "
                   f"stops too; {resume}\n")
  sys.stderr.flush()
  os._exit(1)


def watch_peers(checkpoints: str) -> PeerWatch | None:
  """A `PeerWatch` for a job of more than one process, else None."""
  if jax.process_count() == 1:
    return None
  from jax._src import distributed  # the coordination service's client has no public accessor
  return PeerWatch(distributed.global_state.client, checkpoints)


SEND_BUFFER_BYTES = 4 << 20


def widen_send_buffers() -> int:
  """Gives every TCP socket of this process whose send buffer is smaller
  than `SEND_BUFFER_BYTES` that size; returns how many it widened."""
  widened = 0
  for fd in os.listdir("/proc/self/fd"):
    try:
      if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
        continue
      with socket.socket(fileno=os.dup(int(fd))) as sock:   # the same connection, its own fd
        if (sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < SEND_BUFFER_BYTES):
          sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
          widened += 1
    except OSError:  # closed since the listing
      continue
  return widened


class GlooSendBuffers:
  """A thread that runs `widen_send_buffers` every `period` seconds, for the
  sockets gloo opens as a job's programs first run.

  Why: gloo (JAX's collectives between CPU devices of a distributed job) sets
  a connection's send buffer to the size of the first message it sends from
  a bound buffer, a few KiB, and Linux stops growing a buffer that was set by
  hand. Its later messages of megabytes then leave 64 KiB at a time, each
  piece waiting for the receiver's delayed acknowledgement (40 ms): on
  localhost, the tiny test config's step (a 13 MB gradient all-reduce) took
  12 s among 4 devices instead of 0.5–1.6 s (docs/performance.md). Gloo sets
  the buffer again only while its own record of the size is smaller than a
  message, so a buffer widened here stays wide; one it narrows again is
  widened at the next check."""

  def __init__(self, period: float = 0.02):
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(period,), name="gloo-send-buffers",
                                    daemon=True)
    self._thread.start()

  def _run(self, period: float):
    while not self._stop.wait(period):
      widen_send_buffers()

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


def widen_gloo_send_buffers() -> GlooSendBuffers | None:
  """A `GlooSendBuffers` for a distributed job on CPUs, else None."""
  from jax._src import distributed  # no public accessor says whether the job is distributed
  if distributed.global_state.client is None or jax.default_backend() != "cpu":
    return None
  return GlooSendBuffers()
