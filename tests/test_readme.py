"""The Python examples in the README and the docs run as written, in a
directory whose `exports/demo` is a tiny export (as `make demo` leaves one)
with its open_clip and transformers checkpoints."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
  from dinorank_jax import convert
  from tests import tiny_export
  root = tmp_path_factory.mktemp("readme")
  tiny_export.write(str(root / "exports" / "demo"), formats=convert.FORMATS)
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
