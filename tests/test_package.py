"""Package boundaries: torch belongs to the teacher export and the
converter's PyTorch reader alone; imports between `models/` and `losses/`
run one way (models may use losses)."""

import pathlib
import pkgutil
import re
import subprocess
import sys
import zipfile

import pytest

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


ENTRY_POINTS = ("dinorank_jax.export", "dinorank_jax.evaluate.__main__", "dinorank_jax.convert.__main__",
                "dinorank_jax.data.build", "dinorank_jax.data.verify", "dinorank_jax.teacher.export",
                "dinorank_jax.models.summary", "dinorank_jax.bench.__main__",
                "dinorank_jax.bench.data", "dinorank_jax.bench.losses")


def test_every_command_line_names_its_python_m_and_helps_every_flag(monkeypatch):
  """Each entry point's parser (caught as it parses): the usage line reads
  `python -m dinorank_jax.…`, the parser is `errors.ArgumentParser` (a
  mistake is one line, status 1), and every argument has a help text (its
  default appended once)."""
  import argparse
  import importlib
  from dinorank_jax import errors
  caught = []

  def catch(self, *args, **kwargs):
    caught.append(self)
    raise SystemExit(0)

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
  for name in ENTRY_POINTS:
    caught.clear()
    with pytest.raises(SystemExit):
      importlib.import_module(name).main([])
    parser, = caught
    parsers = [parser] + [sub for action in parser._actions                  # pylint: disable=protected-access
                          if isinstance(action, argparse._SubParsersAction)  # pylint: disable=protected-access
                          for sub in action.choices.values()]
    for p in parsers:
      assert p.prog.startswith(f"python -m {name.removesuffix('.__main__')}"), (name, p.prog)
      assert isinstance(p, errors.ArgumentParser), name
      assert p.formatter_class is errors.HelpFormatter, name
      text = " ".join(p.format_help().split())
      assert not re.search(r"\(default: (None|False|\[\])\)", text), name
      assert not re.search(r"default[^()]*\) \(default:", text), name  # given in the help, not again
      for action in p._actions:                                   # pylint: disable=protected-access
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):  # pylint: disable=protected-access
          assert action.help, (name, action.option_strings or action.dest)


def test_main_help_exits_0_and_lists_every_config_field():
  run = lambda *argv: subprocess.run(
      [sys.executable, "-m", "dinorank_jax.main", *argv], capture_output=True, text=True,
      cwd=ROOT.parent, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  out = run("--help")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("usage: python -m dinorank_jax.main --config")
  for field in ("model.rank_order = 3", "optim.lr", "data.path", "--print_config"):
    assert field in out.stdout, field
  out = run("--config=configs/demo.py", "--config.batch_size=24", "--print_config")
  assert out.returncode == 0 and "batch_size: 24" in out.stdout.splitlines(), out.stderr[-2000:]
