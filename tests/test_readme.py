"""The Python examples in the README and the docs run as written, in a
directory whose `exports/demo` is a tiny export (as `make demo` leaves one)
with its open_clip and transformers checkpoints."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
  from dinorank_jax import convert, export
  from tests import tiny_export
  root = tmp_path_factory.mktemp("readme")
  out = root / "exports" / "demo"
  model_config = tiny_export.write(str(out))
  _, params = export.read(str(out))
  for fmt in convert.FORMATS:                 # as `export --format` writes them
    export.write_clip_checkpoint(str(out), fmt, model_config,
                                 export.clip_checkpoint(fmt, model_config, params))
  return root


@pytest.mark.parametrize("doc", ["README.md", "docs/model.md", "docs/interop.md",
                                 "docs/training.md"])
def test_python_examples_run(doc, demo_export, monkeypatch):
  if doc == "docs/interop.md":
    from tests.open_clip_cpu import import_open_clip
    import_open_clip()                     # torchvision's stand-in, where it is not installed
  blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / doc).read_text(), re.S | re.M)
  assert blocks
  monkeypatch.chdir(demo_export)
  for block in blocks:
    exec(compile(block, doc, "exec"), {})
