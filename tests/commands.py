"""A command run as a user types it: `python -m MODULE ARGS` from the
repository root, answering its exit status and everything it printed."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv, cwd=ROOT) -> tuple[int, str]:
  done = subprocess.run([sys.executable, "-m", *argv], cwd=cwd, capture_output=True, text=True,
                        timeout=300)
  return done.returncode, done.stdout + done.stderr
