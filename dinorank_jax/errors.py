"""User mistakes end in one line; bugs keep their traceback.

Every command's `main` runs under `guard`: a `UserError` (a bad value, a
missing dataset, a busy workdir, a damaged export, …; its message names the
fix) or an expected operating-system error (no such file, no permission,
disk full, read-only file system) prints `error: …` on one line and exits
with status 1. Ctrl-C prints `interrupted: …` on one line (what was kept, when
the command says so by raising `Interrupted`) and exits with status 130, the
shell's for SIGINT. Anything else is a bug and propagates with its traceback.
"""

import errno
import functools
import sys

# errno -> what the user should do about it.
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check the permissions, or choose another path",
    errno.EPERM: "check the permissions, or choose another path",
    errno.ENOSPC: "free disk space (nothing complete was lost: rerun to resume)",
    errno.EDQUOT: "free disk space under your quota (rerun to resume)",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.ENOTDIR: "a path component is a file, not a directory",
    errno.EISDIR: "the path is a directory, not a file",
}


class UserError(Exception):
  """A mistake the user can fix; the message says how, in one line."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C, after the command kept what it could; the message says what."""


def one_line(error: BaseException) -> str:
  """The message of an expected error as one line, or None for a bug."""
  if isinstance(error, UserError):
    return " ".join(str(error).split())
  if isinstance(error, OSError) and error.errno in _OS_FIXES:
    where = f": {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}: {_OS_FIXES[error.errno]}"
  return None


def guard(main):
  """Wraps a command's `main(argv=None)`; see the module docstring."""

  @functools.wraps(main)
  def guarded(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except (UserError, OSError) as e:
      message = one_line(e)
      if message is None:
        raise
      sys.exit(f"error: {message}")
    except KeyboardInterrupt as e:
      print(f"interrupted: {' '.join(str(e).split()) or 'Ctrl-C'}", file=sys.stderr)
      sys.exit(130)

  return guarded
