"""User mistakes end in one line; bugs keep their traceback.

Every command parses its arguments with `ArgumentParser`, whose mistakes
are one `error:` line and status 1 too, and its `main` runs under `guard`:
a `UserError` (a bad value, a missing dataset, a busy workdir, a damaged
export, …; its message names the fix) or an expected operating-system error
(no such file, no permission, disk full, read-only file system) prints
`error: …` on one line and exits with status 1. Ctrl-C prints `interrupted: …` on one line (what was kept, when
the command says so by raising `Interrupted`) and exits with status 130, the
shell's for SIGINT. Anything else is a bug and propagates with its traceback.
"""

import argparse
import errno
import functools
import os
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """argparse's `(default: …)`, once: not where the help already gives the
  default, nor for options that have none (None, off, an empty list)."""

  def _get_help_string(self, action):
    default = action.default
    if ("default" in (action.help or "") or default is None or default is False
        or default is argparse.SUPPRESS or (isinstance(default, list) and not default)):
      return action.help
    return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
  """Every command's parser: a mistake on the command line is one `error:`
  line and status 1, like any other user mistake (argparse's own is its
  usage and status 2), and `--help` gives each default once."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", HelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):
    sys.exit(f"error: {message} ({self.prog} --help lists the options)")


def check_output_directory(path: str, flag: str) -> None:
  """Refuses, before any work is done, a command's output directory that
  cannot be one: an existing file, a path under a file, or a place this user
  cannot write."""
  found = os.path.abspath(path)
  while not os.path.exists(found):            # the nearest part that exists
    found = os.path.dirname(found)
  if not os.path.isdir(found):
    where = "is a file" if found == os.path.abspath(path) else f"lies under the file {found}"
    raise UserError(f"{flag} {path} {where}, not a directory: choose another {flag}")
  if not os.access(found, os.W_OK | os.X_OK):
    raise UserError(f"{flag} {path}: {found} is not writable by you: choose another {flag}")


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
