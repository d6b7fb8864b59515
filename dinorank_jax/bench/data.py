"""Data benchmark: pipeline samples/s against a bare decode-and-crop loop.

    python -m dinorank_jax.bench.data [--records 2048] [--image_size 224] [--settings 1x0,2x0,2x2]

Writes a synthetic dataset of `--records` scenes at `--stored_side` px with
teacher fields of CC3M's shapes (14 × 14 × 256 patch grid, 1024-d class token,
32 × 384 text states), then measures, in one run:

* bare: read each record from the ArrayRecord source in a random order (as
  training reads them), decode the JPEG, random resized crop + flip to
  `--image_size` — the practical limit; the same reading the records in
  file order (what the order costs), and with the JPEG decoded the way the
  pipeline does (`pipeline.resized_crop`: the reduced DCT scale, no copy of
  an RGB image);
* pipeline: `data.pipeline.make_dataset` with the same crops plus shuffling,
  the teacher fields and batching, for each `--threads` and `--workers`
  setting (the teacher grid's resampling runs on the device, in the step).

Both loops first read every record once (the page cache is warm for each),
then run alternately for `--rounds` rounds; the table gives the median rate
of each, so a noisy neighbour slows both rather than one, and the median CPU
time per record (every thread of the process): what the loop takes from a
training step that shares the cores.

Target: the pipeline reaches at least 80 % of the bare loop.
"""

import io
import os
import statistics
import tempfile
import time

import grain
import numpy as np
from PIL import Image

from dinorank_jax import errors
from dinorank_jax.bench import against
from dinorank_jax.data import build, pipeline, records, synthetic


TEACHER = {"grid": [14, 14], "pca_dim": 256, "cls_dim": 1024, "text_dim": 384,
           "text_length": 32}


def write_dataset(directory, num, side, shard_size=512):
  rng = np.random.default_rng(0)
  tokens = np.zeros(77, np.int32)
  tokens[:2] = (49406, 49407)          # start and end of text: an empty but valid caption
  recs = []
  for i in range(num):
    key, image, caption, _ = synthetic.example(0, i, side)
    recs.append({
        "key": key, "jpeg": build.reencode(image, side), "caption": caption,
        "tokens": tokens,
        "teacher_patches": rng.normal(size=(14, 14, 256)).astype(np.float16),
        "teacher_cls": rng.normal(size=1024).astype(np.float16),
        "teacher_text_tokens": rng.normal(size=(32, 384)).astype(np.float16),
        "teacher_text_mask": np.ones(32, bool),
        "teacher_text_pooled": rng.normal(size=384).astype(np.float16)})
  shards = [records.write_shard(directory, i, recs[s:s + shard_size], {})
            for i, s in enumerate(range(0, num, shard_size))]
  records.write_json(os.path.join(directory, records.METADATA),
                     {"schema_version": records.SCHEMA_VERSION, "vocab_size": 49408,
                      "eot_id": 49407, "context_length": 77, "teacher": TEACHER,
                      "shards": [{"file": s["file"], "count": s["count"]} for s in shards]})


def _timed(loop):
  """`(samples/s, CPU µs per sample)` of `loop()`, which returns its sample count."""
  start, cpu = time.perf_counter(), time.process_time()
  count = loop()
  return count / (time.perf_counter() - start), 1e6 * (time.process_time() - cpu) / count


def bare_loop(directory, image_size, draft: bool = False,
              shuffled: bool = True) -> tuple[float, float]:
  """`_timed` read + decode + crop + flip, nothing else. The records are read
  in a random order, as training reads them (`shuffled`; else in file
  order, which the reader serves faster). With `draft`, the image is decoded,
  cropped and flipped as the pipeline does (`pipeline.resized_crop`), else
  by PIL's full decode and resize."""
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(directory))
  rng = np.random.default_rng(0)
  order = rng.permutation(len(source)) if shuffled else range(len(source))

  def loop():
    for i in order:
      image = Image.open(io.BytesIO(records.decode_record(source[int(i)])["jpeg"]))
      x0, y0, w, h = pipeline.crop_box(rng, *image.size)
      flip = bool(rng.integers(2))
      if draft:
        pipeline.resized_crop(image, (x0, y0, w, h), image_size, flip)
      else:    # the pixels as an array; its flip would be a view, which costs nothing
        np.asarray(image.convert("RGB").resize((image_size, image_size), Image.BILINEAR,
                                               box=(x0, y0, x0 + w, y0 + h)))
    return len(source)
  return _timed(loop)


def pipeline_loop(directory, image_size, batch_size, threads, workers) -> tuple[float, float]:
  """`_timed` batches of `data.pipeline.make_dataset`; the first batch (worker
  start-up) is not counted. With workers, the CPU column is the main process's."""
  stream = pipeline.make_dataset(directory, batch_size=batch_size, image_size=image_size,
                                 seed=0, num_epochs=1, threads=threads, worker_count=workers)
  iterator = iter(stream)
  next(iterator)
  try:
    return _timed(lambda: sum(len(batch["tokens"]) for batch in iterator))
  finally:
    iterator.close()          # the workers' shared memory


def run(*, num_records=2048, stored_side=256, image_size=224, batch_size=64,
        settings=((1, 0), (2, 0), (2, 2)), rounds=3) -> list[dict]:
  """Median samples/s and CPU µs per sample of the bare loop and of each
  `(threads, workers)` pipeline setting, alternating for `rounds`; one row each."""
  with tempfile.TemporaryDirectory() as directory:
    write_dataset(directory, num_records, stored_side)
    for path in records.shard_paths(directory):
      records.read_shard(path)                     # warm the page cache
    rates = {"bare": [], "in order": [], "draft": []} | {s: [] for s in settings}
    for _ in range(rounds):
      rates["bare"].append(bare_loop(directory, image_size))
      rates["in order"].append(bare_loop(directory, image_size, shuffled=False))
      rates["draft"].append(bare_loop(directory, image_size, draft=True))
      for s in settings:
        rates[s].append(pipeline_loop(directory, image_size, batch_size, *s))
  median = {k: [statistics.median(column) for column in zip(*v)] for k, v in rates.items()}
  bare = median["bare"][0]
  row = lambda loop, key: {"loop": loop, "samples_s": median[key][0],
                           "of_bare": median[key][0] / bare, "cpu_us": median[key][1]}
  table = [row("bare decode + crop, 1 thread", "bare"), row("bare, read in file order", "in order"),
           row("bare, the pipeline's decode", "draft")]
  for threads, workers in settings:
    r = row(f"pipeline, {threads} threads, {workers} workers", (threads, workers))
    table.append({**r, "met": r["of_bare"] >= 0.8})
  return table


def format_table(table, title) -> str:
  lines = [title, f"{'loop':<34}{'samples/s':>10}{'of bare':>9}{'CPU µs/sample':>15}"]
  for r in table:
    verdict = "" if "met" not in r else f"  [{'met' if r['met'] else 'MISSED'}] target >= 0.80"
    lines.append(f"{r['loop']:<34}{r['samples_s']:>10.0f}{against(r['of_bare'], 0.8):>9}"
                 f"{r['cpu_us']:>15.0f}{verdict}")
  return "\n".join(lines)


@errors.guard
def main(argv=None):
  p = errors.ArgumentParser(prog="python -m dinorank_jax.bench.data",
                            description=__doc__.split("\n")[0])
  p.add_argument("--records", type=int, default=2048, help="synthetic records written")
  p.add_argument("--stored_side", type=int, default=256, help="stored image side")
  p.add_argument("--image_size", type=int, default=224, help="crop side")
  p.add_argument("--batch_size", type=int, default=64, help="pipeline batch")
  p.add_argument("--settings", default="1x0,2x0,2x2",
                 help="comma-separated THREADSxWORKERS pipeline settings to measure")
  p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
  args = p.parse_args(argv)
  if args.records < 2 * args.batch_size:
    p.error(f"--records={args.records} is under two batches of --batch_size={args.batch_size}: "
            f"the first batch is not timed; pass --records {2 * args.batch_size} or more")
  settings = [tuple(int(n) for n in s.split("x")) for s in args.settings.split(",")]
  table = run(num_records=args.records, stored_side=args.stored_side,
              image_size=args.image_size, batch_size=args.batch_size, settings=settings,
              rounds=args.rounds)
  print(format_table(table, f"{os.cpu_count()} CPU cores, {args.records} records stored at "
                            f"{args.stored_side} px, crops to {args.image_size} px; median "
                            f"of {args.rounds} alternating rounds"))


if __name__ == "__main__":
  main()
