"""Checkpoint files from elsewhere are data: nothing in them runs, and a
damaged or hostile one ends in one line (docs/reliability.md).

TorchScript archives are written here by `torch.jit.save`, as OpenAI's are;
the hostile one restores itself with a TorchScript `__setstate__` that writes
a file, which `torch.jit.load` does (checked, so the archive is really
hostile) and our reader must not.
"""

import os
import pickle
import zipfile
from typing import Tuple

import numpy as np
import pytest
import safetensors.numpy
import torch

from dinorank_jax import convert
from dinorank_jax.convert import torchscript
from dinorank_jax.convert.__main__ import main as convert_main


class _Views(torch.nn.Module):
  """Parameters that are views: transposed, strided, offset into a shared
  storage; a float16 buffer, a scalar, an absent bias, a submodule."""

  def __init__(self):
    super().__init__()
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    self.transposed = torch.nn.Parameter(base.t())
    self.strided = torch.nn.Parameter(base[1:, ::3])
    self.register_buffer("halved", torch.linspace(-2, 2, 7).half())
    self.scale = torch.nn.Parameter(torch.tensor(4.5))
    self.linear = torch.nn.Linear(3, 2, bias=False)
    self.not_a_buffer = torch.ones(2)          # a plain attribute: not in the state dict

  def forward(self, x):
    return self.linear(x) * self.scale + self.not_a_buffer


class _Hostile(torch.nn.Module):

  def __init__(self, target: str):
    super().__init__()
    self.weight = torch.nn.Parameter(torch.ones(2))
    self.target = target

  @torch.jit.export
  def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
    return (self.weight, self.target, self.training)

  @torch.jit.export
  def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
    self.weight, self.target, self.training = state[0], state[1], state[2]
    torch.save(self.weight, self.target)       # code the archive brings

  def forward(self, x):
    return x * self.weight


class _Outer(torch.nn.Module):

  def __init__(self, target: str):
    super().__init__()
    self.proj = torch.nn.Parameter(torch.zeros(3))
    self.inner = _Hostile(target)

  def forward(self, x):
    return self.inner(x)


def _one_line(argv) -> str:
  with pytest.raises(SystemExit) as exit_:
    convert_main(argv)
  message = str(exit_.value.code)
  assert message.startswith("error: ") and len(message.splitlines()) == 1, message
  return message


def test_a_torchscript_archive_is_read_as_torch_reads_it_without_torch_running(tmp_path):
  module = torch.jit.script(_Views())
  module.save(str(tmp_path / "views.pt"))
  theirs = torch.jit.load(str(tmp_path / "views.pt")).state_dict()
  ours = torchscript.read(str(tmp_path / "views.pt"))
  assert ours.keys() == theirs.keys()
  for key, value in theirs.items():
    assert ours[key].dtype == value.numpy().dtype, key
    np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)
  assert torchscript.is_archive(str(tmp_path / "views.pt"))
  torch.save(_Views().state_dict(), tmp_path / "pickle.pt")
  assert not torchscript.is_archive(str(tmp_path / "pickle.pt"))


def test_a_hostile_torchscript_archive_is_refused_in_one_line_and_never_run(tmp_path):
  target = tmp_path / "written_by_the_archive"
  torch.jit.script(_Outer(str(target))).save(str(tmp_path / "hostile.pt"))
  torch.jit.load(str(tmp_path / "hostile.pt"))           # torch runs it: the archive is hostile
  assert target.exists()
  target.unlink()
  message = _one_line(["import", "--from", "openai", "--checkpoint", str(tmp_path / "hostile.pt"),
                       "--out", str(tmp_path / "out")])
  assert "_Hostile restores itself with its own code (__setstate__), which is never run" in message
  assert not target.exists() and not (tmp_path / "out").exists()
  # A data.pkl that asks for any other global (here os.system) is refused before it is called.
  class Runs:
    def __reduce__(self):
      return os.system, (f"touch {target}",)
  with zipfile.ZipFile(tmp_path / "hostile.pt", "a") as archive:
    archive.writestr("hostile/data.pkl", pickle.dumps(Runs(), protocol=2))
  with pytest.raises(convert.ConversionError, match=r"its data asks for (posix|os)\.system, "
                     "which a TorchScript archive of weights does not need: refused"):
    torchscript.read(str(tmp_path / "hostile.pt"))
  assert not target.exists()


def test_a_pickle_with_objects_is_refused_by_the_weights_only_loader_in_one_line(tmp_path):
  torch.save({"weight": torch.ones(2), "when": zipfile.ZipInfo("x")}, tmp_path / "objects.pt")
  message = _one_line(["import", "--from", "open_clip", "--checkpoint",
                       str(tmp_path / "objects.pt"), "--out", str(tmp_path / "out")])
  assert "holds zipfile.ZipInfo, which torch's weights-only loader refuses" in message


@pytest.mark.parametrize("kind", ["safetensors", "pickle", "torchscript"])
def test_a_truncated_checkpoint_is_named_damaged_in_one_line(kind, tmp_path):
  path = tmp_path / ("model.safetensors" if kind == "safetensors" else "model.pt")
  if kind == "safetensors":
    safetensors.numpy.save_file({"w": np.ones((64, 64), np.float32)}, str(path))
  elif kind == "pickle":
    torch.save({"w": torch.ones(64, 64)}, path)
  else:
    torch.jit.script(_Views()).save(str(path))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  message = _one_line(["import", "--from", "open_clip", "--checkpoint", str(path),
                       "--out", str(tmp_path / "out")])
  assert f"{path} is damaged (" in message and message.endswith("download or copy it again")


def test_non_finite_weights_are_refused_at_import_naming_the_key(tmp_path):
  state = {"visual.proj": np.ones((4, 4), np.float32), "attn_mask": np.full((2, 2), -np.inf)}
  safetensors.numpy.save_file(state, str(tmp_path / "fine.safetensors"))
  assert convert.read_state_dict(str(tmp_path / "fine.safetensors")).keys() == state.keys()
  state["visual.proj"][1, 2] = np.nan
  safetensors.numpy.save_file(state, str(tmp_path / "nan.safetensors"))
  message = _one_line(["import", "--from", "open_clip", "--checkpoint",
                       str(tmp_path / "nan.safetensors"), "--out", str(tmp_path / "out")])
  assert "'visual.proj' holds NaN or Inf values: not a usable checkpoint" in message
