"""The Python examples in the README and the docs run as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.parametrize("doc", ["README.md", "docs/model.md"])
def test_python_examples_run(doc):
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)
  assert blocks
  for block in blocks:
    exec(compile(block, doc, "exec"), {})
