"""The training loop end to end: metrics, checkpoints, the held-out
evaluation, the evaluation suites on the live parameters and the best
checkpoint (`train.train_and_evaluate`); the run's mechanics under faults,
signals and several processes are test_train.py's."""

import json
import os

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dinorank_jax import checkpoint, export, metric_writer, train
from dinorank_jax.evaluate import clip_benchmark, suites
from tests import tiny_corpus
from tests.tiny_config import get_config as tiny_config


def test_a_failing_evaluation_suite_is_one_line_and_the_run_goes_on(tmp_path, caplog):
  class Failing:           # what an evaluation suite asks of a model, failing where it computes
    batch_size, image_size, has_image_student = 4, 16, False

    def encode_image(self, images):
      raise RuntimeError("device out of memory")
  one = [("0", tiny_corpus.jpeg(np.zeros((8, 8, 3), np.uint8)), 0)]
  name = f"wds:{tiny_corpus.wds(tmp_path / 'w', one, classes=['black'])}"
  assert train.run_suite(name, Failing(), "", 40) == {}
  assert (f"evaluation suite {name} failed at step 40 (RuntimeError: device out of memory); "
          "training goes on") in caplog.text
  assert train.run_suite(f"wds:{tmp_path / 'gone'}", Failing(), "", 40) == {}
  assert f"evaluation suite wds:{tmp_path / 'gone'} at step 40: skipped: not found at" in caplog.text


@pytest.mark.slow
def test_loop_writes_metrics_config_checkpoints_and_evaluates(tmp_path, monkeypatch, caplog):
  """Slow: the whole loop, from data to held-out evaluation and evaluation
  suites on the live parameters, run twice on one workdir."""
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=128)
  workdir = str(tmp_path / "run")
  config = tiny_config(root)
  config.epochs = 4                     # 16 steps: order 2 from step 12
  colours = [(f"{i}", tiny_corpus.jpeg(np.full((40, 56, 3), (200, 40, 40) if i % 2 else
                                                (40, 40, 200), np.uint8)), i % 2)
             for i in range(12)]
  suite_names = [f"records:{os.path.join(root, 'val')}",
                 f"wds:{tiny_corpus.wds(tmp_path / 'wds_colours', colours, classes=['blue', 'red'])}"]
  config.eval.suites = ",".join([*suite_names, "imagenet"])     # no ImageNet under data_dir
  config.eval.data_dir = str(tmp_path / "datasets")
  config.eval.keep_best = "eval/wds/wds_colours/acc1"
  config.eval_every = 8                 # evaluated at steps 8 and 16
  # The progress bar (its rate and ETA) starts once the step is compiled.
  order, compile_fitting, bar, steps = [], train._compile_fitting, train.tqdm, []

  def compile_ahead(*args, **kwargs):
    compiled, report = compile_fitting(*args, **kwargs)
    steps.append(compiled)
    order.append("compiled")
    return compiled, report
  monkeypatch.setattr(train, "_compile_fitting", compile_ahead)
  monkeypatch.setattr(train, "tqdm", lambda *a, **k: (order.append("bar"), bar(*a, **k))[1])
  result = train.train_and_evaluate(config, workdir)
  assert order == ["compiled", "bar"]
  from_suites = {k: v for k, v in result.items() if k.startswith(("eval/records/", "eval/wds/"))}
  assert set(result) - set(from_suites) == {
      "eval/skipped", "eval/examples", "retrieval/i2t_r1", "retrieval/t2i_r1",
      "zero_shot/colour", "zero_shot/shape", "zero_shot/colour_shape_texture"}
  # The suites' numbers at the best step are an export's of that step, named as
  # CLIP_benchmark names them.
  at = {step: {k: v for m in metric_writer.read(workdir) if m["step"] == step for k, v in m.items()}
        for step in (8, 16)}
  best = max((8, 16), key=lambda step: (at[step][config.eval.keep_best], -step))
  assert checkpoint.read_best(workdir)["step"] == best
  export.main(["--workdir", workdir, "--out", str(tmp_path / "export"), "--step", "best"])
  exported = export.load(str(tmp_path / "export"), batch_size=config.eval_batch_size)
  for name in suite_names:
    found = suites.run(name, exported, config.eval.data_dir, batch_size=config.eval_batch_size)
    expected = {f"eval/{k}": v for k, v in clip_benchmark.flat(name, found["metrics"]).items()}
    assert expected and set(expected) <= set(from_suites)
    for key, value in expected.items():
      assert at[best][key] == pytest.approx(value, abs=1e-4), key
  assert {"eval/records/val/colour/acc1", "eval/wds/wds_colours/acc1",
          "eval/records/val/image_retrieval_recall@1"} <= set(from_suites)
  assert from_suites["eval/wds/wds_colours/seconds"] > 0
  missing = [r.getMessage() for r in caplog.records if "config.eval.suites" in r.getMessage()]
  assert len(missing) == 1 and missing[0].startswith(
      f"config.eval.suites: imagenet skipped: not found at {config.eval.data_dir}"), missing
  assert 0 <= result["zero_shot/colour"] <= 1 and result["eval/skipped"] == 0
  logged = metric_writer.read(workdir)
  train_rows = [m for m in logged if "loss" in m]
  assert [m["step"] for m in train_rows] == list(range(1, 17))
  for key in ("clip", "rank_cross", "rank_in", "distill_image", "distill_text", "fusion_gate",
              "rank_gate_penalty", "image_rank_head_gate_2", "text_rank_head_gate_3",
              "rank_weight", "logit_scale", "lr", "active_order", "data/skipped_total",
              "data/skipped_invalid",
              "step_seconds", "samples_per_second", "grad_norm", "param_norm", "update_norm"):
    assert key in train_rows[-1], key
  assert train_rows[-1]["param_norm"] > train_rows[-1]["update_norm"] > 0
  # Compiled once, ahead of the first step, and kept out of every step time:
  # every step calls that executable, which cannot trace or compile again (a
  # bound on the first step's seconds failed on a busy machine: its data
  # pipeline starting up took as long as lowering).
  compiled = [m for m in logged if "compile/compile_seconds" in m]
  assert len(compiled) == 1 and compiled[0]["step"] == 0
  assert compiled[0]["compile/temp_bytes"] > 0 and compiled[0]["compile/equations"] > 0
  assert len(steps) == 1 and isinstance(steps[0], jax.stages.Compiled)
  assert train_rows[11]["active_order"] == 1 and train_rows[12]["active_order"] == 2
  assert any("zero_shot/colour" in m for m in logged[-4:])
  assert json.load(open(os.path.join(workdir, "config.json")))["batch_size"] == 32
  events = EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  assert [e.step for e in events.Scalars("loss")] == list(range(1, 17))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "8"]
  assert "eval/wds/wds_colours/acc1" in logged[-1]
  # A finished run resumes at its end: no step is taken again.
  config.eval.suites = ""
  train.train_and_evaluate(config, workdir)
  assert len([m for m in metric_writer.read(workdir) if "loss" in m]) == 16
