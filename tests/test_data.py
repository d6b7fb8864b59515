"""Records, builders and the crop-aligned pipeline (method §7); the teacher
export's tests are test_teacher.py's."""

import io
import json
import logging
import os
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dinorank_jax.data import build, pipeline, records, synthetic
from dinorank_jax.losses import distill
from dinorank_jax.data.tokenizer import TextTokenizer
from tests import tiny_corpus
from tests.tiny_corpus import build_args


EOT = 49407


def _tokens(fill=0):
  """Token ids all `fill` but the last, an end-of-text (a valid caption)."""
  tokens = np.full(77, fill, np.int32)
  tokens[-1] = EOT
  return tokens


def _write_dataset(directory, recs, shard_size=8, teacher=None):
  os.makedirs(directory, exist_ok=True)
  shards = [records.write_shard(directory, i, recs[s:s + shard_size], {})
            for i, s in enumerate(range(0, len(recs), shard_size))]
  records.write_json(os.path.join(directory, records.METADATA),
                     {"schema_version": records.SCHEMA_VERSION, "vocab_size": EOT + 1,
                      "eot_id": EOT, "context_length": 77, "teacher": teacher,
                      "shards": [{"file": s["file"], "count": s["count"]} for s in shards]})


def test_record_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  recs = [{"key": f"k{i}", "jpeg": rng.bytes(100), "caption": f"café nº{i}",
           "tokens": rng.integers(0, 49408, 77).astype(np.int32),
           "teacher_patches": rng.normal(size=(3, 4, 8)).astype(np.float16),
           "teacher_text_mask": rng.integers(0, 2, 5).astype(bool)} for i in range(10)]
  _write_dataset(str(tmp_path), recs, shard_size=4)
  back = [records.decode_record(b) for p in records.shard_paths(str(tmp_path))
          for b in records.read_shard(p)]
  assert len(back) == 10
  for a, b in zip(recs, back):
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(a[k], np.ndarray):
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes()
      else:
        assert a[k] == b[k]


def test_crop_alignment_of_image_and_teacher_grid():
  """Pixels and teacher cells both encode their own image position; after any
  crop and flip, each student token's teacher target names the position its
  own pixels show, within half a teacher cell."""
  h_t, w_t, grid = 14, 14, (8, 8)
  for width, height in ((120, 90), (640, 480)):       # the second exercises JPEG draft scaling
    xs, ys = np.meshgrid((np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height)
    pixels = np.stack([xs * 255, ys * 255, np.zeros_like(xs)], -1).astype(np.uint8)
    tx, ty = np.meshgrid((np.arange(w_t) + 0.5) / w_t, (np.arange(h_t) + 0.5) / h_t)
    teacher = np.stack([tx, ty], -1).astype(np.float16)
    record = records.encode_record({
        "jpeg": tiny_corpus.jpeg(pixels), "tokens": np.zeros(77, np.int32),
        "teacher_patches": teacher,
        "teacher_cls": np.zeros(4, np.float16), "teacher_text_tokens": np.zeros((2, 3), np.float16),
        "teacher_text_mask": np.ones(2, bool), "teacher_text_pooled": np.zeros(3, np.float16)})
    decode = pipeline.Decode(image_size=64, seed=5, crop_scale=(0.1, 1.0))
    for position in range(40):
      example = decode.map((position, (0, [record])))
      target = np.asarray(distill.align_teacher_grid(
          jnp.asarray(example["teacher_patches"])[None], jnp.asarray(example["crop"])[None],
          jnp.asarray(example["flip"])[None], grid))[0].reshape(*grid, 2)
      centres = (np.arange(grid[0]) + 0.5) * 64 / grid[0]
      seen = example["image"][centres.astype(int)][:, centres.astype(int), :2] / 255.0
      # Half a teacher cell, plus JPEG and resampling error of the pixels.
      np.testing.assert_allclose(target, seen, atol=0.5 / w_t + 0.03)
      # Noise-free: replay the draws to get the box and flip, compare with the
      # analytic token centres (exact inside the grid, clamped at its edges).
      replay = np.random.default_rng([5, position])
      x0, y0, w, h = pipeline.crop_box(replay, width, height, (0.1, 1.0))
      crop = np.asarray([x0 / width, y0 / height, w / width, h / height])
      exact = np.stack(distill.token_centres(crop, grid, bool(replay.integers(2))), -1)
      np.testing.assert_array_less(np.abs(target - exact), 0.5 / w_t + 1e-3)
      clamped = np.clip(exact, 0.5 / w_t, 1 - 0.5 / w_t)
      np.testing.assert_allclose(target, clamped, atol=2e-3)
  # Both flips occurred: the x-ramp in the image runs both ways across seeds.
  directions = {np.sign(pipeline.Decode(64).map((i, (0, [record])))["image"][32, -1, 0].astype(int) - 128)
                for i in range(20)}
  assert directions == {-1, 1}


def _ids(batches):
  """Record ids: the records of these tests carry their id in every token."""
  return [int(t) for b in batches for t in b["tokens"][:, 1]]


def test_processes_read_their_rows_of_the_same_global_batches(tmp_path):
  directory = str(tmp_path / "ids")
  recs = [{"key": f"{i}", "jpeg": tiny_corpus.jpeg(np.full((8, 8, 3), i, np.uint8)), "caption": "x",
           "tokens": _tokens(i)} for i in range(40)]
  _write_dataset(directory, recs)
  make = lambda p, n: iter(pipeline.make_dataset(directory, batch_size=8 // n, image_size=8,
                                                 seed=3, shard_index=p, shard_count=n))
  one = make(0, 1)
  alone = [next(one) for _ in range(5)]                       # one epoch of 40
  assert sorted(_ids(alone)) == list(range(40))
  two = [make(p, 2) for p in range(2)]
  for batch in alone:                                         # same rows, same crops
    halves = [next(it) for it in two]
    for k in ("tokens", "image", "crop", "flip"):
      np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), batch[k])


def test_restored_iterator_continues_exactly(tmp_path):
  directory = tiny_corpus.synthetic(tmp_path)
  make = lambda: iter(pipeline.make_dataset(directory, batch_size=8, image_size=16, seed=1))
  full = make()
  reference = [next(full) for _ in range(12)]       # past one epoch of 64 records
  part = make()
  for _ in range(5):
    next(part)
  state = part.get_state()
  resumed = make()
  resumed.set_state(state)
  for expected in reference[5:]:
    got = next(resumed)
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k])


def test_worker_processes_make_the_same_batches(tmp_path):
  directory = tiny_corpus.synthetic(tmp_path)
  make = lambda **kw: iter(pipeline.make_dataset(directory, batch_size=8, image_size=16, seed=1,
                                                 num_epochs=1, **kw))
  in_process, workers = list(make(threads=1)), make(worker_count=1)
  try:
    from_workers = list(workers)
  finally:
    workers.close()
  assert len(from_workers) == len(in_process) == 8
  for got, expected in zip(from_workers, in_process):
    assert got.keys() == expected.keys()
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k])


def test_builders_skip_and_count_bad_inputs(tmp_path, caplog):
  good = tiny_corpus.jpeg(np.full((300, 400, 3), 120, np.uint8))
  (tmp_path / "a.jpg").write_bytes(good)
  (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  (tmp_path / "c.jpg").write_bytes(good)
  table = tmp_path / "pairs.tsv"
  table.write_text("image\tcaption\na.jpg\ta grey picture\nb.jpg\tbroken\nc.jpg\t   \n"
                   "missing.jpg\tno file\n")
  with caplog.at_level(logging.WARNING):
    meta = build.build(build_args(source="tsv", input=str(table), out=str(tmp_path / "t"),
                                   workers=1))
  assert meta["counts"] == {"written": 1, "corrupt": 2, "empty_caption": 1, "syn_caption": 0}
  assert f"skipped 000000001 ({tmp_path / 'b.jpg'}): corrupt (" in caplog.text   # PIL's reason
  assert (f"skipped 000000003 ({tmp_path / 'missing.jpg'}: No such file or directory): corrupt "
          "(no image data)") in caplog.text
  rec = records.decode_record(records.read_shard(records.shard_paths(str(tmp_path / "t"))[0])[0])
  assert rec["caption"] == "a grey picture" and min(Image.open(io.BytesIO(rec["jpeg"])).size) == 256
  sidecar = json.loads((tmp_path / "t" / "shard-00000.json").read_text())
  assert sorted(sidecar["skipped_keys"]) == ["000000001", "000000002", "000000003"]

  _tar(tmp_path / "00000.tar", [(key, {"jpg": image, "txt": text}) for key, image, text in
                                (("k1", good, b"a cat"), ("k2", b"junk", b"a dog"), ("k3", good, b""))])
  meta = build.build(build_args(source="webdataset", input=str(tmp_path / "*.tar"),
                                 out=str(tmp_path / "w"), workers=1))
  assert meta["counts"] == {"written": 1, "corrupt": 1, "empty_caption": 1, "syn_caption": 0}


def _tar(path, samples):
  with tarfile.open(path, "w") as tar:
    for key, members in samples:
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_synthetic_captions_from_every_source_reach_alip_batches(tmp_path):
  good = tiny_corpus.jpeg(np.full((40, 40, 3), 120, np.uint8))
  rows = ["image\tcaption\tsyn_caption"]
  for i in range(4):
    (tmp_path / f"{i}.jpg").write_bytes(good)
    rows.append(f"{i}.jpg\tgrey picture {i}\t" + (f"a  plain grey square {i}" if i < 3 else " "))
  (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
  out = str(tmp_path / "t")
  meta = build.build(build_args(source="tsv", input=str(tmp_path / "pairs.tsv"), out=out,
                                 workers=1))
  assert meta["counts"]["written"] == 4 and meta["counts"]["syn_caption"] == 3
  recs = [records.decode_record(r) for r in records.read_shard(records.shard_paths(out)[0])]
  tokenize = lambda texts: TextTokenizer()(texts, 77)
  assert recs[0]["syn_caption"] == "a plain grey square 0"       # whitespace collapsed
  np.testing.assert_array_equal(recs[0]["syn_tokens"], tokenize(["a plain grey square 0"])[0])
  assert "syn_caption" not in recs[3] and "syn_tokens" not in recs[3]   # kept, without one

  # ALIP's batches pair each raw caption with its own synthetic one; the
  # record without one is skipped and counted.
  pairs = {tuple(tokenize([f"grey picture {i}"])[0]): tokenize([f"a plain grey square {i}"])[0]
           for i in range(3)}
  loader = iter(pipeline.make_dataset(out, batch_size=3, image_size=8, seed=0,
                                      syn_captions=True))
  batches = [next(loader) for _ in range(2)]                   # epochs 1 and 2
  for b in batches:
    for raw, syn in zip(b["tokens"], b["syn_tokens"]):
      np.testing.assert_array_equal(syn, pairs[tuple(raw)])
  assert 1 <= sum(int(b["skipped"].sum()) for b in batches) <= 2
  assert "syn_tokens" not in next(iter(pipeline.make_dataset(out, batch_size=3, image_size=8,
                                                             seed=0)))

  _tar(tmp_path / "00000.tar", [("k1", {"jpg": good, "txt": b"a cat", "syn.txt": b"a grey square"}),
                                ("k2", {"jpg": good, "txt": b"a dog"})])
  meta = build.build(build_args(source="webdataset", input=str(tmp_path / "*.tar"),
                                 out=str(tmp_path / "w"), workers=1))
  assert meta["counts"]["written"] == 2 and meta["counts"]["syn_caption"] == 1
  recs = [records.decode_record(r)
          for r in records.read_shard(records.shard_paths(str(tmp_path / "w"))[0])]
  assert recs[0]["caption"] == "a cat" and recs[0]["syn_caption"] == "a grey square"


def test_the_finiteness_check_agrees_with_numpy_on_every_kind_of_float():
  specials = [0.0, -0.0, 1.0, -2.5, np.nan, -np.nan, np.inf, -np.inf]
  for dtype in (np.float16, np.float32, np.float64):
    info = np.finfo(dtype)
    values = np.asarray(specials + [info.max, -info.max, info.smallest_subnormal], dtype)
    for value in values:
      grid = np.ones((3, 4), dtype)
      grid[1, 2] = value
      assert records.all_finite(grid) == bool(np.isfinite(grid).all()), (dtype, value)
    assert records.all_finite(np.zeros((0, 5), dtype))
  # A NaN with another payload (float16 0x7E01, float32 0x7FC00001) is still NaN.
  assert not records.all_finite(np.asarray([0x7E01], np.uint16).view(np.float16))
  assert not records.all_finite(np.asarray([0x7FC00001], np.uint32).view(np.float32))


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_a_grey_or_cmyk_jpeg_record_trains_as_rgb(mode):
  pixels = np.random.default_rng(0).integers(0, 255, (24, 40, 3), np.uint8)
  image = Image.fromarray(pixels).convert(mode)
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=95)
  record = records.encode_record({"jpeg": out.getvalue(), "tokens": _tokens()})
  decode = pipeline.Decode(image_size=16, seed=0)
  examples = [decode.map((position, (0, [record]))) for position in range(8)]
  assert all(e["image"].shape == (16, 16, 3) and e["image"].dtype == np.uint8 for e in examples)
  assert {bool(e["flip"]) for e in examples} == {False, True}
  if mode == "L":
    assert all((e["image"] == e["image"][..., :1]).all() for e in examples)


def test_pipeline_skips_bad_records_and_fails_on_a_broken_source(tmp_path):
  good = {"key": "g", "jpeg": tiny_corpus.jpeg(np.zeros((8, 8, 3), np.uint8)), "caption": "x",
          "tokens": _tokens()}
  bad = {**good, "jpeg": b"garbage"}
  _write_dataset(str(tmp_path / "few"), [good] * 30 + [bad] * 2)
  loader = iter(pipeline.make_dataset(str(tmp_path / "few"), batch_size=16, image_size=8,
                                     seed=0))
  batches = [next(loader) for _ in range(4)]   # 64 good: all of epochs 1-2, part of 3
  assert all(len(b["tokens"]) == 16 for b in batches)
  corrupt = records.SKIP_REASONS.index("corrupt")
  assert 4 <= sum(int(b["skipped"][:, corrupt].sum()) for b in batches) <= 6
  assert sum(int(b["skipped"].sum()) for b in batches) == sum(
      int(b["skipped"][:, corrupt].sum()) for b in batches)
  _write_dataset(str(tmp_path / "broken"), [bad] * 120)
  loader = pipeline.make_dataset(str(tmp_path / "broken"), batch_size=4, image_size=8,
                                seed=0)
  with pytest.raises(records.DataError, match="max_skip_fraction=0.01.*data.verify"):
    next(iter(loader))


def test_synthetic_corpus_is_deterministic_and_labelled(tmp_path):
  a, b = synthetic.example(7, 3), synthetic.example(7, 3)
  assert a == b and synthetic.example(8, 3)[1:3] != a[1:3]
  for i in range(50):
    _, _, caption, extra = synthetic.example(0, i)
    for text in (caption, extra["syn_caption"]):
      assert synthetic.TASKS["colour"][extra["labels"]["colour"]] in text
      assert synthetic.TASKS["shape"][extra["labels"]["shape"]] in text
    assert extra["syn_caption"] != caption
  meta = records.read_metadata(tiny_corpus.synthetic(tmp_path, num=40))
  assert meta["counts"]["written"] == meta["counts"]["syn_caption"] == 40
  assert len(meta["zero_shot_tasks"]["colour_shape_texture"]) == 120


def test_brace_patterns_name_shards_and_the_build_window_is_bounded(tmp_path):
  for i in range(3):
    (tmp_path / f"{i:05d}.tar").write_bytes(b"")
  assert build.expand(str(tmp_path / "{00000..00002}.tar")) == [
      str(tmp_path / f"{i:05d}.tar") for i in range(3)]
  assert build.expand(str(tmp_path / "{00002,00000}.tar")) == [
      str(tmp_path / "00002.tar"), str(tmp_path / "00000.tar")]

  class Pool:                      # counts what is submitted and not yet collected
    live = most = 0

    def submit(self, fn, *args):
      Pool.live += 1
      Pool.most = max(Pool.most, Pool.live)

      class Done:
        def result(self):
          Pool.live -= 1
          return fn(*args)
      return Done()

  tasks = ((lambda i: {"count": i}, i) if i % 3 else {"count": i} for i in range(100))
  results = list(build._in_order(Pool(), tasks, window=4))
  assert [r["count"] for r in results] == list(range(100)) and Pool.most <= 4


def test_an_interrupted_build_continues_from_its_finished_shards(tmp_path):
  out = str(tmp_path / "raw")
  args = lambda: build.parser().parse_args(
      ["--source", "synthetic", "--out", out, "--num", "48", "--shard_size", "16",
       "--workers", "1"])
  build.build(args())
  shard = lambda i: os.path.join(out, records.shard_name(i))
  expected = [records.read_shard(p) for p in records.shard_paths(out)]
  # Killed while writing shard 1 (its records there, its sidecar not yet) and
  # before shard 2: the rerun must rebuild both and keep shard 0 as it is.
  os.remove(shard(1) + ".json")
  with open(shard(1) + ".array_record", "r+b") as f:
    f.truncate(100)
  os.remove(shard(2) + ".json")
  os.remove(shard(2) + ".array_record")
  os.utime(shard(0) + ".array_record", (1, 1))
  meta = build.build(args())
  assert os.stat(shard(0) + ".array_record").st_mtime == 1        # trusted: not rewritten
  assert [records.read_shard(p) for p in records.shard_paths(out)] == expected
  assert meta["counts"]["written"] == 48


def _one_line_build(*argv) -> str:
  with pytest.raises(SystemExit) as exit_:
    build.main(list(argv))
  message = str(exit_.value.code)
  assert message.startswith("error: ") and len(message.splitlines()) == 1, message
  return message


def test_damaged_or_missing_inputs_are_named_never_silently_fewer(tmp_path, caplog):
  good = tiny_corpus.jpeg(np.full((40, 40, 3), 120, np.uint8))
  noise = tiny_corpus.jpeg(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
  samples = [(f"k{i}", {"jpg": noise, "txt": f"picture {i}".encode()}) for i in range(8)]
  _tar(tmp_path / "00000.tar", samples[:4])
  _tar(tmp_path / "00001.tar", samples[4:])
  whole = (tmp_path / "00001.tar").read_bytes()
  (tmp_path / "00001.tar").write_bytes(whole[:len(whole) // 2])    # cut short
  (tmp_path / "00002.tar").write_bytes(b"<html>502 Bad Gateway</html>")   # not a tar
  _tar(tmp_path / "00003.tar", [("k8", {"jpg": good, "txt": b"caf\xe9 au lait"}),   # Latin-1
                                ("k9", {"jpg": good, "txt": "café".encode()}),
                                ("k10", {"jpg": b"<html>404</html>", "txt": b"a page"}),
                                ("k11", {"txt": b"no picture"})])
  _tar(tmp_path / "00004.tar", [(f"m{i}", members) for i, (_, members) in enumerate(samples)])
  with tarfile.open(tmp_path / "00004.tar") as tar:
    second = tar.getmembers()[3]                        # m1.txt: cut after it, at a boundary
  boundary = second.offset_data + -(-second.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
  (tmp_path / "00004.tar").write_bytes((tmp_path / "00004.tar").read_bytes()[:boundary])
  with caplog.at_level(logging.WARNING):
    meta = build.build(build_args(source="webdataset", input=str(tmp_path / "0000[0-4].tar"),
                                   out=str(tmp_path / "w"), workers=1))
  damaged = {os.path.basename(d["file"]): d["why"] for d in meta["damaged_inputs"]}
  assert sorted(damaged) == ["00001.tar", "00002.tar", "00004.tar"]
  assert "unexpected end of data" in damaged["00001.tar"]
  assert "ends without tar's end-of-archive marker" in damaged["00004.tar"]
  assert meta["counts"]["corrupt"] == 3
  shard = tmp_path / "00003.tar"        # each skip names its tar member and why
  assert f"skipped k8 ({shard}: k8.jpg): corrupt (caption is not UTF-8)" in caplog.text
  assert f"skipped k10 ({shard}: k10.jpg): corrupt (cannot identify image file)" in caplog.text
  assert (f"skipped k11 ({shard}: k11 (no .jpg, .png or .webp member)): corrupt (no image data)"
          in caplog.text)
  captions = [records.decode_record(r)["caption"]
              for p in records.shard_paths(str(tmp_path / "w")) for r in records.read_shard(p)]
  assert "café" in captions and not any("\ufffd" in c for c in captions)
  # 00000's 4, what came before 00001's cut, k9, and 00004's m0 and m1.
  assert 7 <= meta["counts"]["written"] <= 9
  assert len(noise) > 4096
  # A brace pattern naming shards that are not there is refused, naming them.
  message = _one_line_build("--source", "webdataset", "--input",
                            str(tmp_path / "{00003..00007}.tar"), "--out", str(tmp_path / "b"))
  assert "3 of the 5 tar shards --input names are missing" in message
  assert "00005.tar" in message and not (tmp_path / "b").exists()
  for flag, value in (("--num", "-5"), ("--shard_size", "0")):
    message = _one_line_build("--source", "synthetic", "--out", str(tmp_path / "s"), flag, value)
    assert f"{flag} must be at least 1, got {value}" in message


def test_a_full_disk_while_writing_a_shard_is_the_disk_full_line(tmp_path, monkeypatch):
  class Full:
    def __init__(self, *args):
      pass

    def write(self, data):
      raise RuntimeError("write() failed: No space left on device")

  monkeypatch.setattr(records, "ArrayRecordWriter", Full)
  message = _one_line_build("--source", "synthetic", "--out", str(tmp_path / "s"), "--num", "4",
                            "--workers", "1")
  assert message.startswith("error: No space left on device:") and "free disk space" in message


def test_regenerated_inputs_under_the_same_names_are_another_build(tmp_path):
  """`build.json` holds a fingerprint of the inputs, so tars rebuilt under
  the same names are not resumed as the old dataset, and teacher features
  exported from the old images do not join the new ones."""
  good = tiny_corpus.jpeg(np.full((40, 40, 3), 120, np.uint8))
  _tar(tmp_path / "00000.tar", [("k0", {"jpg": good, "txt": b"old caption"})])
  argv = ["--source", "webdataset", "--input", str(tmp_path / "{00000..00000}.tar"),
          "--out", str(tmp_path / "w"), "--workers", "1"]
  build.main(argv)
  old_build = records.read_build(str(tmp_path / "w"))
  features = {**records.read_metadata(str(tmp_path / "w")), "images": "../w",
              "images_build": old_build}
  os.makedirs(tmp_path / "t")
  assert records.images_directory(str(tmp_path / "t"), features) == str(tmp_path / "w")
  _tar(tmp_path / "00000.tar", [("k0", {"jpg": good, "txt": b"a new caption, longer"})])
  assert "inputs:" in _one_line_build(*argv)               # not resumed as the old build
  build.main(argv + ["--overwrite"])
  assert records.read_build(str(tmp_path / "w"))["inputs"] != old_build["inputs"]
  with pytest.raises(records.DataError, match="was rebuilt after the teacher features"):
    records.images_directory(str(tmp_path / "t"), features)
