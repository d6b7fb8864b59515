"""One run per workdir: the lock, and the config each start ran with.

`lock(workdir)` holds `workdir/lock.json` (process id, host, start time)
for the life of a run; a second trainer on the same workdir is refused in
one line naming the holder. A lock left by a dead process on this host is
taken over with a warning; a lock from another host cannot be checked from
here, so the message says which file to delete once that run is gone. In a
multi-host job process 0 holds it.

Every start writes its resolved config to `workdir/starts/<time>-step<N>.json`
and makes `workdir/config.json` that config (the one the checkpoints now
follow); nothing earlier is overwritten. `config_changes` compares a resumed
run's config with the stored one: a change to the model or to the data order
is refused unless allowed on purpose, any other change is reported.
"""

import contextlib
import datetime
import json
import logging
import os
import socket

from dinorank_jax.errors import UserError

LOCK = "lock.json"
CONFIG = "config.json"
STARTS = "starts"
# Fields (or whole groups) whose change makes a resumed run another run: the
# parameters would not fit, or the batches would not continue where they were.
FIXED_ON_RESUME = ("model", "seed", "batch_size", "data.path", "data.num_records",
                   "data.image_size")
# Model fields that decide how a run compiles, not its parameters or batches
# (a layout change the checkpoint cannot hold is refused by `checkpoint`).
FREE_ON_RESUME = ("model.scan", "model.remat", "model.attention", "model.rank_chunk_size")
# Fields added after runs were stored, with the value that reproduces what
# those runs did: a stored config without one had that value.
ADDED_FIELDS = {"model.arch": "dinorank", "init_from": "", "model.attention": "flax",
                "device_memory_gib": 0.0}


class WorkdirBusy(UserError):
  """Another live run holds the workdir."""


class ChangedConfig(UserError):
  """A resumed run's config changes a field it may not change."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:      # alive, another user's
    return True
  return True


def _read_lock(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


@contextlib.contextmanager
def lock(workdir: str, *, active: bool = True):
  """Holds the workdir for the `with` block (a no-op unless `active`). A
  workdir this call created and the block left empty (a run that failed
  before writing anything) is removed again."""
  if not active:
    yield
    return
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  mine = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  for attempt in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read_lock(path)
      if attempt == 0 and _stale(holder):
        logging.warning("taking over the stale lock %s (%s)", path, _describe(holder))
        with contextlib.suppress(FileNotFoundError):
          os.unlink(path)
        continue
      raise WorkdirBusy(f"{workdir} is in use by another run ({_describe(holder)}): wait "
                        f"for it, or choose another --workdir; if that run is gone, delete "
                        f"{path}") from None
    with os.fdopen(fd, "w") as f:
      json.dump(mine, f)
    break
  try:
    yield
  finally:
    if _read_lock(path) == mine:
      os.unlink(path)
    if created and not os.listdir(workdir):
      os.rmdir(workdir)


def _stale(holder: dict | None) -> bool:
  """True for an unreadable lock, or one whose process on this host is gone."""
  if holder is None:
    return True
  return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))


def _describe(holder: dict | None) -> str:
  if holder is None:
    return "unreadable lock file"
  return f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def stored_config(workdir: str) -> dict | None:
  """The config the run's checkpoints follow (`config.json`), if any; a file
  that is not a JSON object (edited by hand, emptied) is one line naming it."""
  path = os.path.join(workdir, CONFIG)
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    stored = json.loads(text)
    problem = None if isinstance(stored, dict) else f"holds a JSON {type(stored).__name__}"
  except json.JSONDecodeError as e:
    problem = f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
  if problem:
    raise UserError(f"{path} {problem}, not the run's config: fix it, or copy the newest "
                    f"file of {os.path.join(workdir, 'starts')} over it")
  return stored


def config_changes(stored: dict, config: dict, *, allow: bool = False) -> list[str]:
  """The fields of `config` (a JSON dict) that differ from `stored`, as
  `name: old -> new`. Raises `ChangedConfig` when one of them is in
  `FIXED_ON_RESUME` and not `allow`."""
  old, new = _flatten(stored), _flatten(config)
  old |= {k: v for k, v in ADDED_FIELDS.items() if k in new and k not in old}
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  fixed = [k for k in changed if k not in FREE_ON_RESUME
           and any(k == f or k.startswith(f + ".") for f in FIXED_ON_RESUME)]
  line = lambda k: f"config.{k}: {old.get(k)!r} -> {new.get(k)!r}"
  if fixed and not allow:
    raise ChangedConfig(
        f"the checkpoints in this workdir were trained with another "
        f"{', '.join(f'config.{k}' for k in fixed)} ({'; '.join(map(line, fixed))}): resume "
        "with the stored config (its config.json), choose a new --workdir, or pass "
        "--allow_config_change to change it on purpose")
  return [line(k) for k in changed]


def record_start(workdir: str, config_json: str, step: int) -> str:
  """Writes this start's config copy and makes it `config.json`; returns the copy's path."""
  directory = os.path.join(workdir, STARTS)
  os.makedirs(directory, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
  copy = os.path.join(directory, f"{stamp}-step{step}.json")
  for path in (copy, os.path.join(workdir, CONFIG)):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(config_json)
    os.replace(tmp, path)
  return copy
