"""Package boundaries: torch belongs to the teacher export and the
converter's PyTorch reader alone; imports between `models/` and `losses/`
run one way (models may use losses)."""

import pathlib
import pkgutil
import re
import subprocess
import sys
import zipfile

import dinorank_jax

ROOT = pathlib.Path(dinorank_jax.__file__).parent
TORCH_IMPORT = re.compile(r"^\s*(import|from)\s+(torch|transformers)\b", re.M)


# The converter reads PyTorch pickles there, importing torch inside the reader.
TORCH_READER = pathlib.Path("convert", "files.py")


def test_no_torch_import_outside_the_teacher_export_and_the_pickle_reader():
  offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
               if "teacher" not in p.relative_to(ROOT).parts and p.relative_to(ROOT) != TORCH_READER
               and TORCH_IMPORT.search(p.read_text())]
  assert not offenders, offenders


def test_importing_every_module_loads_no_torch():
  modules = [m.name for m in pkgutil.walk_packages([str(ROOT)], "dinorank_jax.")
             if ".teacher" not in m.name]
  code = ("import importlib, sys\n"
          f"for m in {modules!r}: importlib.import_module(m)\n"
          "print(sorted(m for m in ('torch', 'transformers', 'wandb') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_losses_never_import_models():
  offenders = [p.name for p in (ROOT / "losses").glob("*.py")
               if re.search(r"^\s*(from|import)\s+dinorank_jax\.models", p.read_text(), re.M)]
  assert not offenders, offenders


def test_the_method_is_cited_inside_the_repository():
  """No module, config, test or doc points outside the repository; every
  `method §N` names a section of docs/method.md."""
  repo = ROOT.parent
  sections = set(re.findall(r"^## §(\d+) ", (repo / "docs" / "method.md").read_text(), re.M))
  assert sections == {str(n) for n in range(1, 8)}
  texts = [p for d in ("dinorank_jax", "configs", "tests", "docs", "launch")
           for p in (repo / d).rglob("*") if p.suffix in (".py", ".md", ".sh")]
  texts += [repo / "README.md", repo / "pyproject.toml"]
  for path in texts:
    if path == pathlib.Path(__file__):
      continue
    text = path.read_text()
    assert "SPEC" not in text and "../shared" not in text, path
    for n in re.findall(r"method §(\d+)", text):
      assert n in sections, (path, n)


def test_the_wheel_builds_without_warnings_and_holds_the_package_only(tmp_path):
  out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path),
                        str(ROOT.parent)], capture_output=True, text=True, check=True)
  assert "Warning" not in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
  names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
  assert "dinorank_jax/train.py" in names
  assert {f"dinorank_jax/gpu_targets/{t}.txtpb" for t in ("h100", "h200", "a100")} <= set(names)
  assert not any(n.startswith(("configs/", "launch/", "tests/")) for n in names)
