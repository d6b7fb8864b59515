"""Package boundaries: torch belongs to the teacher export alone; imports
between `models/` and `losses/` run one way (models may use losses)."""

import pathlib
import pkgutil
import re
import subprocess
import sys

import dinorank_jax

ROOT = pathlib.Path(dinorank_jax.__file__).parent
TORCH_IMPORT = re.compile(r"^\s*(import|from)\s+(torch|transformers)\b", re.M)


def test_no_torch_import_outside_the_teacher_export():
  offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
               if "teacher" not in p.relative_to(ROOT).parts and TORCH_IMPORT.search(p.read_text())]
  assert not offenders, offenders


def test_importing_every_module_loads_no_torch():
  modules = [m.name for m in pkgutil.walk_packages([str(ROOT)], "dinorank_jax.")
             if ".teacher" not in m.name]
  code = ("import importlib, sys\n"
          f"for m in {modules!r}: importlib.import_module(m)\n"
          "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_losses_never_import_models():
  offenders = [p.name for p in (ROOT / "losses").glob("*.py")
               if re.search(r"^\s*(from|import)\s+dinorank_jax\.models", p.read_text(), re.M)]
  assert not offenders, offenders
