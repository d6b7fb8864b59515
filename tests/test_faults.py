"""Faults and user mistakes, one probe per class (docs/reliability.md): each
ends in a correct result or one clear line, and nothing is lost."""

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from dinorank_jax import errors, train, workdir as workdir_lib
from dinorank_jax.checkpoint import IncompatibleCheckpoint
from dinorank_jax.data import build, pipeline, records, verify
from dinorank_jax.evaluate import metrics
from tests import commands, tiny_corpus
from tests.tiny_config import CONFIGS, LEAN_FLAGS, lean_config, get_config as tiny_config

ROOT = os.path.dirname(CONFIGS)

# Evaluation that cannot flatter.

def test_nonfinite_or_zero_embeddings_are_an_error_not_a_score():
  with pytest.raises(metrics.InvalidEmbeddings, match="8 of 8 class embeddings .*8 not finite"):
    metrics.zero_shot(np.eye(8)[:4], np.full((8, 8), np.nan), np.arange(4))
  image = np.eye(8)[:4].copy()
  image[2] = 0
  with pytest.raises(metrics.InvalidEmbeddings, match="1 of 4 image embeddings .*1 zero"):
    metrics.retrieval(image, np.eye(8)[:4], np.arange(4))
  with pytest.raises(metrics.InvalidEmbeddings, match="text"):
    metrics.modality_gap(np.eye(4), np.full((4, 4), np.inf))


def test_ties_are_pessimistic_so_a_constant_model_scores_zero():
  constant = np.ones((6, 4))
  assert metrics.zero_shot(constant, np.ones((3, 4)), np.arange(6) % 3, ks=(1,))["top1"] == 0
  got = metrics.retrieval(constant, constant, np.arange(6), ks=(1, 5))
  assert got == {"i2t_r1": 0.0, "i2t_r5": 0.0, "t2i_r1": 0.0, "t2i_r5": 0.0}


# One run per workdir.

def test_workdir_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path, caplog):
  work = str(tmp_path / "run")
  with workdir_lib.lock(work):
    holder = json.load(open(os.path.join(work, workdir_lib.LOCK)))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"process {os.getpid()} on"):
      with workdir_lib.lock(work):
        pass
    # The trainer takes the same lock before it reads data or compiles.
    with pytest.raises(workdir_lib.WorkdirBusy, match="in use by another run"):
      train.train_and_evaluate(tiny_config(str(tmp_path / "no-data")), work)
  assert not os.path.exists(work)           # released, and the empty run it made removed
  with pytest.raises(errors.UserError):     # a new run that fails before it writes anything
    train.train_and_evaluate(tiny_config(str(tmp_path / "no-data")), str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new")

  os.makedirs(work)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock_file = os.path.join(work, workdir_lib.LOCK)
  json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": "then"},
            open(lock_file, "w"))
  with caplog.at_level(logging.WARNING), workdir_lib.lock(work):
    assert json.load(open(lock_file))["pid"] == os.getpid()
  assert "taking over the stale lock" in caplog.text
  json.dump({"pid": 1, "host": "elsewhere", "started": "then"}, open(lock_file, "w"))
  with pytest.raises(workdir_lib.WorkdirBusy, match=f"delete {re.escape(lock_file)}"):
    with workdir_lib.lock(work):
      pass
  assert json.load(open(lock_file))["host"] == "elsewhere"         # another host's: untouched


def _flip_byte(path: str, at: float = 0.5) -> None:
  with open(path, "r+b") as f:
    size = f.seek(0, 2)
    f.seek(int(size * at))
    byte = f.read(1)
    f.seek(int(size * at))
    f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path: str) -> None:
  """A partial write: the file loses its second half."""
  with open(path, "r+b") as f:
    f.truncate(f.seek(0, 2) // 2)


def _largest_file(directory: str) -> str:
  files = [os.path.join(d, n) for d, _, names in os.walk(directory) for n in names]
  return max(files, key=os.path.getsize)


@pytest.mark.slow
def test_resume_falls_back_refuses_changed_fields_and_keeps_every_config(tmp_path, caplog):
  """In-process: a damaged latest checkpoint falls back to the one before,
  changed fields are refused, every start keeps its config. From the command
  line, on a copy of the same run: a latest checkpoint without
  `state/_METADATA` is damage like any other; when none restores, the one
  line is all that is said — none of the `Event loop is closed` tracebacks
  that tensorstore's late reads print after a failed restore.
  Slow: one run of 16 steps, then six starts on it and two command-line starts on its copy;
  each damage needs checkpoints a run wrote."""
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=64, num_eval=32)
  work = str(tmp_path / "run")
  config = lean_config(root)
  config.epochs, config.data.eval_path = 8, ""       # 16 steps; checkpoints 8 and 16
  train.train_and_evaluate(config, work)
  shutil.copytree(work, tmp_path / "copy")
  # A damaged latest checkpoint: one line, the previous one is used, the run
  # finishes again, and the damaged files are kept aside.
  _truncate(_largest_file(os.path.join(work, "checkpoints", "16", "state")))
  config.epochs = 9                                  # 18 steps
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, work)
  assert "checkpoint 16 in" in caplog.text and "resuming from checkpoint 8" in caplog.text
  assert os.path.isdir(os.path.join(work, "damaged_checkpoints", "16"))
  steps = [m["step"] for m in map(json.loads, open(os.path.join(work, "metrics.jsonl")))
           if "loss" in m]
  assert steps[-10:] == list(range(9, 19))           # steps 9-18 again, from 8
  assert "config.epochs: 8 -> 9" in caplog.text      # a change that is allowed is said

  # A change to the model or the data order is refused, naming the fields.
  changed = lean_config(root)
  changed.epochs, changed.data.eval_path, changed.batch_size = 9, "", 16
  with pytest.raises(workdir_lib.ChangedConfig,
                     match=r"another config.batch_size \(config.batch_size: 32 -> 16\)"):
    train.train_and_evaluate(changed, work)
  changed.batch_size, changed.model.embed_dim = 32, 32
  with pytest.raises(workdir_lib.ChangedConfig, match="config.model.embed_dim"):
    train.train_and_evaluate(changed, work)
  # On purpose: the checkpoint still cannot hold the other shapes, and says so.
  with pytest.raises(IncompatibleCheckpoint, match=r"has shape \(.*64.*\), the model's is"):
    train.train_and_evaluate(changed, work, allow_config_change=True)
  # Every start kept its own config; config.json is the last run's.
  starts = sorted(os.listdir(os.path.join(work, workdir_lib.STARTS)))
  assert len(starts) == 2 and starts[0].endswith("-step0.json") and starts[1].endswith("-step8.json")
  assert [json.load(open(os.path.join(work, "starts", s)))["epochs"] for s in starts] == [8, 9]

  # Every checkpoint damaged: one line naming each, nothing deleted.
  for step in os.listdir(os.path.join(work, "checkpoints")):
    _truncate(_largest_file(os.path.join(work, "checkpoints", step, "state")))
  with pytest.raises(errors.UserError, match="no checkpoint in .* restores .*move"):
    train.train_and_evaluate(config, work)
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["16", "18", "8"]

  # From the command line, on the copy: checkpoints 8 and 16 as the first run left them.
  run = ["dinorank_jax.main", f"--config=tests/tiny_config.py:{root}", *LEAN_FLAGS,
         f"--workdir={tmp_path / 'copy'}", "--config.data.eval_path=", "--config.epochs=9"]
  checkpoints = tmp_path / "copy" / "checkpoints"
  os.remove(checkpoints / "16" / "state" / "_METADATA")
  code, out = commands.run(*run)
  assert code == 0 and "Traceback" not in out, out[-2000:]
  assert "checkpoint 16 in" in out and "_METADATA is missing" in out
  assert "resuming from checkpoint 8" in out
  for step in os.listdir(checkpoints):
    _truncate(_largest_file(str(checkpoints / step / "state")))
  code, out = commands.run(*run)
  assert code == 1, out[-2000:]
  assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
  assert out.strip().splitlines()[-1].startswith("error: no checkpoint in ")


def test_a_run_stored_before_a_model_field_existed_resumes_as_it_was_trained():
  config = json.loads(tiny_config("/data").to_json_best_effort())
  stored = json.loads(json.dumps(config))
  del stored["model"]["arch"]                  # written before config.model.arch existed
  assert workdir_lib.config_changes(stored, config) == []
  config["model"]["arch"] = "openai"
  with pytest.raises(workdir_lib.ChangedConfig, match=r"config.model.arch: 'dinorank' -> "
                     r"'openai'"):
    workdir_lib.config_changes(stored, config)


# Bad data: skipped, counted and named.

def _damage(directory: str) -> dict[str, int]:
  """Rewrites the first shard of `directory` and of the images it joins with
  one record of each kind of damage; returns how many records of each skip
  reason they hold."""
  images = records.images_directory(directory, records.read_metadata(directory))
  read = lambda d: [dict(records.decode_record(r)) for r in records.read_shard(
      records.shard_paths(d)[0])]
  features, recs = read(directory), read(images)
  features[0]["teacher_patches"] = features[0]["teacher_patches"][:2]  # another grid
  del features[1]["teacher_cls"]                                       # missing field
  features[2]["teacher_cls"] = np.full_like(features[2]["teacher_cls"], np.nan)
  recs[3]["tokens"] = np.full_like(recs[3]["tokens"], 10 ** 6)         # outside the vocabulary
  recs[4]["tokens"] = np.zeros_like(recs[4]["tokens"])                 # an empty caption
  recs[5]["jpeg"] = b"not a jpeg"
  features[6]["teacher_text_mask"] = features[6]["teacher_text_mask"].astype(np.float16)
  features[7]["key"] = "another record's"                              # out of step
  records.write_shard(directory, 0, features, {})
  records.write_shard(images, 0, recs, {})
  return {"invalid": 6, "nonfinite": 1, "corrupt": 1}


def test_bad_records_are_skipped_counted_and_named(tmp_path, caplog):
  directory = tiny_corpus.corpus(str(tmp_path / "train"), num=128)
  expected = _damage(directory)
  images = records.images_directory(directory, records.read_metadata(directory))
  _flip_byte(records.shard_paths(images)[1], at=0.3)     # a damaged chunk of shard 1's images
  expected["unreadable"] = 1
  with caplog.at_level(logging.WARNING):   # batches of 1: no partial batch drops a count
    stream = iter(pipeline.make_dataset(directory, batch_size=1, image_size=16, seed=0,
                                        num_epochs=1, max_skip_fraction=0.2))
    batches = list(stream)
  skipped = np.sum([b["skipped"].sum(0) for b in batches], axis=0)
  assert dict(zip(records.SKIP_REASONS, skipped.tolist())) == expected
  assert sum(len(b["tokens"]) for b in batches) == 119
  assert "shard-00000.array_record #1 (key" in caplog.text and "'teacher_cls' missing" in caplog.text
  assert "NaN or infinite" in caplog.text and "shard-00001.array_record #" in caplog.text
  assert "'teacher_patches' is float16[2, 4, 8], metadata.json says [4, 4, 8]" in caplog.text
  assert "teacher features of key \"another record's\" sit beside" in caplog.text

  # data.verify reports the same counts, and exits 1.
  result = verify.verify(directory, log=lambda s: None)
  assert result["skipped"] == expected and result["ok"] == 119
  with pytest.raises(SystemExit) as exit_:
    verify.main([directory])
  assert exit_.value.code == 1

  # Past the threshold: one line naming the field and the verifier.
  stream = iter(pipeline.make_dataset(directory, batch_size=8, image_size=16, seed=0,
                                      min_seen=64))
  with pytest.raises(records.DataError, match=r"\d+ of \d+ records .*max_skip_fraction=0.01"
                                              r".*data.verify"):
    for _ in range(40):                    # past 64 records seen
      next(stream)


def test_an_unopenable_shard_is_left_out_or_stops_the_run_in_one_line(tmp_path, caplog):
  directory = tiny_corpus.corpus(str(tmp_path / "train"), num=128)
  path = records.shard_paths(directory)[1]
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 3)
  with pytest.raises(records.DataError, match="1 shards of .* cannot be read .*shard-00001"):
    pipeline.make_dataset(directory, batch_size=8, image_size=16, seed=0)
  with caplog.at_level(logging.WARNING):
    stream = iter(pipeline.make_dataset(directory, batch_size=8, image_size=16, seed=0,
                                        num_epochs=1, max_skip_fraction=0.6))
    assert sum(len(b["tokens"]) for b in stream) == 64
  assert "unusable shard" in caplog.text and "shard-00001" in caplog.text
  # No usable shard at all: verify counts every record as lost and exits 1, in its own words.
  os.remove(records.shard_paths(directory)[0])
  lines = []
  result = verify.verify(directory, log=lines.append)
  assert result["ok"] == 0 and result["lost"] == 128 and len(result["unusable_shards"]) == 2
  assert "128 records, 0 usable" in lines[0] and "2 unusable shards (128 records)" in lines[0]
  with pytest.raises(SystemExit) as exit_:
    verify.main([directory])
  assert exit_.value.code == 1


def test_training_logs_skips_and_finishes(tmp_path):
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=128, num_eval=32)
  _damage(os.path.join(root, "train"))
  config = lean_config(root)
  config.epochs, config.data.eval_path, config.data.max_skip_fraction = 2, "", 0.2
  train.train_and_evaluate(config, str(tmp_path / "run"))
  last = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][-1]
  # Every pass over a bad record counts it: 2 epochs and the prefetch of a third.
  assert 6 * 2 <= last["data/skipped_invalid"] <= 6 * 3
  assert 2 <= last["data/skipped_nonfinite"] <= 3 and last["data/skipped_unreadable"] == 0
  assert last["data/skipped_total"] == sum(last[f"data/skipped_{r}"] for r in records.SKIP_REASONS)


# Builders that refuse to mix.

def test_rebuild_with_other_arguments_is_refused_unless_overwrite(tmp_path):
  out = str(tmp_path / "raw")
  args = lambda *extra: build.parser().parse_args(
      ["--source", "synthetic", "--out", out, "--num", "32", "--shard_size", "16",
       "--workers", "1", *extra])
  build.build(args())
  build.build(args())                                          # the same build: resumed
  with pytest.raises(records.DataError, match=r"seed: 0 -> 1.*--overwrite"):
    build.build(args("--seed", "1"))
  first = records.read_shard(records.shard_paths(out)[0])
  build.build(args("--seed", "1", "--overwrite"))
  assert records.read_shard(records.shard_paths(out)[0]) != first
  assert json.load(open(os.path.join(out, records.BUILD_FILE)))["seed"] == 1


def test_a_caption_of_any_length_is_read(tmp_path):
  from PIL import Image
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
  caption = "a long caption " * 20000                                # 300,000 characters
  (tmp_path / "pairs.tsv").write_text(f"image\tcaption\na.png\t{caption}\n")
  out = str(tmp_path / "t")
  meta = build.build(build.parser().parse_args(
      ["--source", "tsv", "--input", str(tmp_path / "pairs.tsv"), "--out", out,
       "--workers", "1"]))
  assert meta["counts"]["written"] == 1
  record = records.decode_record(records.read_shard(records.shard_paths(out)[0])[0])
  assert record["caption"] == " ".join(caption.split()) and record["tokens"].shape == (77,)
