"""The config checks (`dinorank_jax.config_checks`): every field and every
shape the model and step assume, refused in one line before anything is
built."""

import importlib.util
import json
import os
import runpy

import pytest

from dinorank_jax import config_checks
from tests.tiny_config import CONFIGS, get_config as tiny_config


@pytest.mark.parametrize("fields,message", [
    ({"model.image_trunk": "B/33"}, r"^config.model.image_trunk=B/33 cuts config.data.image_size=32 "
     r"into 0.97 patches a side: the side must be a multiple of the patch, e.g. "
     r"--config.data.image_size=33$"),
    ({"data.image_size": 36}, r"^config.model.image_trunk=tiny/8 cuts config.data.image_size=36 "
     r"into 4.5 patches a side: .* --config.data.image_size=32$"),
    ({"model.image_student": "tiny/5"}, r"^config.model.image_student=tiny/5 cuts "),
    ({"model.image_trunk": "tiny/0"}, r"^config.model.image_trunk must be '<size>/<patch>'"),
    ({"objective.list_len": 2}, r"^config.objective.list_len=2 leaves config.model.rank_order=3 "
     r"no position to act on \(it needs 3\): set --config.objective.list_len=3 or more"),
    ({"objective.high_order_len": 1}, r"^config.objective.high_order_len=1 leaves "),
    ({"optim.accum_steps": 3}, r"^config.batch_size=32 must be a multiple of "
     r"config.optim.accum_steps=3 x 8 devices"),
    ({"objective.rank_scope": "local", "batch_size": 16},
     r"^config.model.rank_order=3 ranks lists of 2 items \(config.batch_size=16, "
     r"objective.rank_scope=local, 8 devices\): a list needs at least as many items as the order$"),
    ({"data.path": "/data/long"}, r"^config.data.path=/data/long holds captions of 78 tokens, "
     r"more than the text tower's context of 77: rebuild it"),
    ({"eval.suites": "imagenet, imagenett"}, r"^config.eval.suites: unknown suite 'imagenett': "
     r"pick from imagenet, .*wds:DIR or probe:NAME$"),
])
def test_impossible_geometry_is_refused_in_one_line_before_anything_is_built(fields, message):
  """Every shape the model and step assume, checked from the config and the
  dataset's metadata alone (`validate`, `check_data`) before anything is built."""
  config = tiny_config("/data/tiny")
  for name, value in fields.items():
    section, _, field = name.rpartition(".")
    (config[section] if section else config)[field] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.validate(config)
    config_checks.check_data(config, {"counts": {"written": 64},
                                      "teacher": {"text_length": 8},
                                      "context_length": 78 if config.data.path == "/data/long"
                                      else 77})


def test_the_configs_geometry_passes_those_checks():
  config = tiny_config("/data/tiny")
  config_checks.validate(config)
  config_checks.check_data(config, {"counts": {"written": 64}, "teacher": {"text_length": 8},
                        "context_length": 77})
  config.model.students, config.model.image_student = "none", "tiny/5"   # no student: no check
  config_checks.validate(config)


def test_alip_refuses_records_without_synthetic_captions():
  config = runpy.run_path(os.path.join(CONFIGS, "alip.py"))["get_config"]("/data/cc3m")
  with pytest.raises(config_checks.ConfigError, match=r"^config.objective.alip needs synthetic "
                     r"captions, and config.data.path=/data/cc3m has none: rebuild it with a "
                     r"syn_caption"):
    config_checks.check_data(config, {"counts": {"written": 10, "syn_caption": 0},
                                      "teacher": None})


def test_wandb_writer_logs_offline_and_is_imported_only_when_asked(tmp_path, monkeypatch):
  from dinorank_jax.metric_writer import MetricWriter
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  writer = MetricWriter(str(tmp_path), wandb={"project": "dinorank_jax_test", "name": "t",
                                              "config": {"batch_size": 32}})
  writer.write(1, {"loss": 2.5})
  writer.write(2, {"loss": 2.0})
  writer.close()
  runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
  assert len(runs) == 1 and runs[0].stat().st_size > 0
  assert [json.loads(l)["loss"] for l in open(tmp_path / "metrics.jsonl")] == [2.5, 2.0]
  config = tiny_config(str(tmp_path))
  config.log.wandb = True
  config_checks.validate(config)
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else find_spec(name, *a))
  with pytest.raises(config_checks.ConfigError, match=r"^config.log.wandb is on but wandb is not "
                     r"installed: pip install 'dinorank_jax\[wandb\]'"):
    config_checks.validate(config)
