"""The order sweep: each order trained once, a stopped one resumed, every
order's row in the merged report (`dinorank_jax.sweep`, `evaluate.order_table`)."""

import json
import os

import pytest

from dinorank_jax import errors, metric_writer, sweep, train
from dinorank_jax.evaluate import report
from tests import tiny_corpus
from tests.commands import run
from tests.tiny_config import lean_config


def _losses(run_dir: str) -> list[int]:
  return [m["step"] for m in metric_writer.read(run_dir) if "loss" in m]


@pytest.mark.slow
def test_a_sweep_trains_each_order_once_resumes_a_stopped_one_and_reports_every_order(
    tmp_path, monkeypatch):
  """Slow: two orders of the lean tiny model, 4 steps each."""
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=64)
  config = lean_config(root)
  config.epochs = 2                          # 2 steps an epoch at batch 32
  config.checkpoint.every = 2
  config.eval_every, config.data.eval_path = 0, ""      # the suite evaluates the export
  workdir, names = str(tmp_path / "sweep"), [f"records:{os.path.join(root, 'val')}"]
  # Order 2 stopped after its first epoch, before the sweep began.
  stopped = sweep.order_config(config, 2)
  stopped.epochs = 1
  train.train_and_evaluate(stopped, sweep.paths(workdir, 2)["run"])
  assert _losses(sweep.paths(workdir, 2)["run"]) == [1, 2]

  # As on several processes: trained, but exported and evaluated by a later
  # one-process run of the same command.
  monkeypatch.setattr(sweep, "evaluates_here", lambda: False)
  assert sweep.sweep(config, workdir, [0], names, root) is None             # nothing reported
  assert _losses(sweep.paths(workdir, 0)["run"]) == [1, 2, 3, 4]
  monkeypatch.undo()
  with pytest.raises(errors.UserError, match=r"order 0 was trained but nothing was evaluated: "
                     r"every suite was skipped \(skipped: not found at .*run again with the right "
                     r"--data_dir or --suite"):
    sweep.sweep(config, workdir, [0], [f"records:{tmp_path / 'elsewhere'}"], root)
  merged = sweep.sweep(config, workdir, [0], names, root)
  assert "Table 5" not in open(os.path.join(merged, "report.md")).read()    # one order
  first = os.path.join(sweep.paths(workdir, 0)["report"], report.RESULTS)
  reported_at = os.stat(first).st_mtime_ns

  merged = sweep.sweep(config, workdir, [0, 2], names, root)
  assert _losses(sweep.paths(workdir, 0)["run"]) == [1, 2, 3, 4]            # not trained again
  assert os.stat(first).st_mtime_ns == reported_at                           # nor evaluated
  assert _losses(sweep.paths(workdir, 2)["run"]) == [1, 2, 3, 4]            # resumed at step 2
  results = json.load(open(os.path.join(merged, report.RESULTS)))
  assert list(results["models"]) == ["r0", "r2"]
  assert "order_sweep.png" in results["figures"]
  for name, m in results["models"].items():
    assert m["model"]["source"]["step"] == 4 and m["training"]["steps"] == 4, name
    assert m["training"]["step_seconds"] > 0 and m["training"]["peak_bytes"] > 0, name
    assert (m["training"]["devices"], m["training"]["processes"]) == (8, 1), name
  assert results["models"]["r0"]["training"]["rank_head_params"] == 0
  assert results["models"]["r2"]["training"]["rank_head_params"] > 0
  table = open(os.path.join(merged, "report.md")).read().split("## Table 5")[1].split("\n## ")[0]
  rows = {line.split(" | ")[0].strip("| "): line.strip(" |").split(" | ")[1:]
          for line in table.splitlines() if line.startswith("| ")}
  assert rows["rank order"] == ["0 (CLIP)", "2"]
  assert rows["step time, paper (8 × H100)"] == ["301", "348"]
  assert rows["step time / order 0, paper"] == ["1.00", "1.16"]
  assert rows["step time / order 0"][0] == "1.00"
  assert "Ours: 4 steps of batch 32 on 8 cpu devices in 1 process;" in table
  # Each order's numbers are its own report's.
  colour = json.load(open(os.path.join(sweep.paths(workdir, 2)["report"], report.RESULTS)))
  (r2,) = colour["models"].values()
  value = r2["suites"][names[0]]["metrics"]["zero_shot/colour/top1"]
  assert rows["records/val colour zero-shot top-1 (%)"][1] == f"{100 * value:.2f}"


def test_the_sweep_command_lists_its_flags_and_refuses_main_only_ones():
  status, out = run("dinorank_jax.sweep", "--help")
  assert status == 0 and "--orders" in out and "--suite" in out and "--print_config" not in out
  status, out = run("dinorank_jax.sweep", "--config", "configs/demo.py", "--print_config")
  assert status != 0 and out.strip().splitlines()[-1].startswith("error: unknown flag --print_config")
  with pytest.raises(errors.UserError, match="give each rank order once"):
    sweep._orders(["1", "1"])                                   # pylint: disable=protected-access
  with pytest.raises(errors.UserError, match="as integers"):
    sweep._orders(["1", "three"])                               # pylint: disable=protected-access
