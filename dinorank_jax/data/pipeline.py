"""The Grain input pipeline with crop-aligned teacher targets (method §7).

    ArrayRecordDataSource → per-epoch shuffle (seeded) → this process's rows
    of each global batch → decode + random resized crop + flip (seeded by
    the stream position) → batch of the per-process size → a prefetch
    thread (or worker processes)

With `threads = 1` one background thread reads, decodes and batches, a
record after another. With more, Grain's pool of that many threads decodes
records ahead of the batching thread. The pool costs CPU per record (a
future, a lock, and a scan of the ready records on every one taken; Grain's
batching ran in the caller's thread too): the demo's order-1 step took
0.288 s with one thread against 0.301 s through a pool of one and 0.306 s
through a pool of two, and 0.254 s with no data loading at all
(docs/performance.md § The input pipeline). A pool pays off where decoding,
not Python, is the cost: large JPEGs on many cores.

and, on the device, `losses.distill.align_teacher_grid` resamples each
teacher patch grid into its image's crop box, flipped like the image. The
host ships the grid as stored plus the crop (`crop` = `(x0, y0, w, h)` as
fractions of the stored image, `flip`): the resampling is a small
gather-and-lerp that costs the accelerator nothing and took a quarter of the
host's time per record.

The stream is endless (epochs follow one another, reshuffled); the trainer
takes a fixed number of steps, so every process yields the same number of
batches and the collectives never wait on a short shard. The iterator's
`get_state()` / `set_state()` resume mid-epoch exactly.

Bad data is skipped, counted and named, never a crash: a shard that cannot
be opened is left out at start-up (`records.Shards`), a record whose bytes
cannot be read, do not decode, or do not fit `metadata.json`
(`records.check_record`) is dropped and logged once with its shard, index
and key. `batch["skipped"]` `[B, len(SKIP_REASONS)]` sums to the skips of the
batch per reason (also from worker processes). Once more than
`max_skip_fraction` of the records seen (at least `MIN_SEEN`), or of the
dataset's records in unusable shards, are bad, `records.DataError` stops the
run in one line.
"""

import io
import logging
import math
import os

import grain
from absl import flags
import numpy as np
from PIL import Image

from dinorank_jax.data import records, transform


def crop_box(rng: np.random.Generator, width: int, height: int,
             scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[float, float, float, float]:
  """A random resized crop `(x0, y0, w, h)` in pixels (torchvision's rule:
  ten tries at a random area and log-uniform aspect, else the centre crop)."""
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
    if w <= width and h <= height:
      return rng.uniform(0, width - w), rng.uniform(0, height - h), w, h
  side = min(width, height)
  return (width - side) / 2, (height - side) / 2, side, side


def resized_crop(image: Image.Image, box, side: int, flip: bool = False) -> np.ndarray:
  """uint8 `[side, side, 3]`: the crop `box` = `(x0, y0, w, h)` (pixels) of
  `image`, resized bilinearly, mirrored left to right with `flip`. A JPEG is
  decoded at the coarsest DCT scale (1/2, 1/4 or 1/8) that still gives the
  crop at least `side` pixels each way; the scaled image's sides are each
  rounded up from the scale separately, so the box is mapped per axis.

  PIL mirrors the image: NumPy's copy of a `[:, ::-1]` view of 3-byte pixels
  (the batching's) took 230 µs a 224-px image against PIL's 14 µs."""
  x0, y0, w, h = box
  width, height = image.size
  image.draft("RGB", (side * width / w, side * height / h))
  sx, sy = image.size[0] / width, image.size[1] / height
  box = (x0 * sx, y0 * sy, min((x0 + w) * sx, image.size[0]), min((y0 + h) * sy, image.size[1]))
  if image.mode != "RGB":
    image = image.convert("RGB")     # on an RGB image, a copy
  image = image.resize((side, side), Image.BILINEAR, box=box)
  return np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image)


MIN_SEEN = 1000         # records seen before the skipped fraction is judged
SKIPPED = "skipped"


class RecordSource:
  """The usable shards' records, read one at a time: element `i` is `(i,
  [bytes, …])` (the record, then its images' record when the dataset joins an
  image dataset), or `(i, "why")` when the bytes cannot be read (a damaged
  chunk)."""

  def __init__(self, shards: records.Shards):
    self.shards = shards
    self._sources = []                     # none when no shard is usable (grain refuses zero)
    if shards.paths:
      self._sources.append(grain.sources.ArrayRecordDataSource(shards.paths))
      if shards.images:
        self._sources.append(grain.sources.ArrayRecordDataSource(shards.image_paths))

  def __len__(self) -> int:
    return len(self._sources[0]) if self._sources else 0

  def __getitem__(self, index: int):
    try:
      return index, [source[index] for source in self._sources]
    except Exception as e:  # Riegeli raises RuntimeError with the damage in the text
      return index, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


class Decode(grain.transforms.Map):
  """`(stream position, (record index, record bytes))` -> one example (or a
  skip marker naming the record and the reason). With `shards` (what the
  readers pass), each record is first checked against their metadata.

  With `augment`, the random resized crop and flip are drawn from
  `(seed, position)`: the same record at the same place of the global stream
  gets the same augmentation however many processes read it. Without, the
  example is `transform.preprocess`'s (evaluation: shorter side resized
  bicubic, centre square), unflipped. With `syn_captions`,
  the example carries the record's `syn_tokens` (ALIP); a record without
  them is skipped.
  """

  def __init__(self, image_size: int, seed: int = 0, crop_scale=(0.5, 1.0),
               augment: bool = True, syn_captions: bool = False,
               shards: records.Shards | None = None):
    self.image_size, self.seed, self.crop_scale = image_size, seed, crop_scale
    self.augment, self.syn_captions, self.shards = augment, syn_captions, shards

  def map(self, element):
    position, (index, data) = element
    if isinstance(data, str):
      return self._skip("unreadable", index, None, data)
    try:
      record = records.decode_joined(data)
    except Exception as e:  # msgpack raises many types for bad bytes
      return self._skip("corrupt", index, None, f"not a record ({type(e).__name__})")
    if isinstance(record, str):
      return self._skip("invalid", index, None, record)
    bad = (records.check_record(record, self.shards.meta, syn_captions=self.syn_captions)
           if self.shards else None)
    if bad:
      return self._skip(bad[0], index, record.get("key"), bad[1])
    try:
      return self._example(record, position)
    except Exception as e:  # PIL raises many types for bad JPEG bytes
      return self._skip("corrupt", index, record.get("key"),
                        f"the image does not decode ({type(e).__name__}: {str(e)[:100]})")

  def _skip(self, reason: str, index: int, key, detail: str) -> dict:
    """The skip marker of record `index`: the reason, and where and why."""
    where = (f"{self.shards.directory}/{self.shards.where(index)}" if self.shards
             else f"record {index}")
    if key is not None:
      where += f" (key {key!r})"
    return {"_skip": reason, "_why": f"{where}: {detail}"}

  def _example(self, record: dict, position: int) -> dict:
    image = Image.open(io.BytesIO(record["jpeg"]))
    width, height = image.size
    if self.augment:
      rng = np.random.default_rng([self.seed, position])
      (x0, y0, w, h), flip = crop_box(rng, width, height, self.crop_scale), bool(rng.integers(2))
      pixels = resized_crop(image, (x0, y0, w, h), self.image_size, flip)
      crop = (x0 / width, y0 / height, w / width, h / height)
    else:
      pixels, flip = transform.preprocess(image, self.image_size), False
      crop = transform.crop_fraction(width, height, self.image_size)
    example = {"image": pixels,
               "tokens": np.asarray(record["tokens"], np.int32),
               "crop": np.asarray(crop, np.float32),
               "flip": np.asarray(flip)}
    if self.syn_captions:
      example["syn_tokens"] = np.asarray(record["syn_tokens"], np.int32)
    if "teacher_patches" in record:
      example.update(
          teacher_patches=record["teacher_patches"],
          teacher_cls=record["teacher_cls"],
          teacher_text_tokens=record["teacher_text_tokens"],
          teacher_text_mask=record["teacher_text_mask"],
          teacher_text_pooled=record["teacher_text_pooled"])
    return example


def too_many_skipped(directory: str, skipped: int, seen: int, max_fraction: float) -> str:
  return (f"{skipped} of {seen} records of {directory} are bad (more than "
          f"config.data.max_skip_fraction={max_fraction}): see which and why with python -m "
          f"dinorank_jax.data.verify {directory}, then rebuild or repair it")


class _BatchIterator(grain.DatasetIterator):

  def __init__(self, parent, batch_size, directory, min_seen, max_fraction):
    super().__init__(parent)
    self.batch_size, self.directory = batch_size, directory
    self.min_seen, self.max_fraction = min_seen, max_fraction
    self.seen = self.skipped = 0
    self.logged = set()

  def __next__(self):
    batch, row = None, 0
    skipped = np.zeros((self.batch_size, len(records.SKIP_REASONS)), np.int32)
    while row < self.batch_size:
      element = next(self._parent)           # the end of the stream drops a partial batch
      self.seen += 1
      if "_skip" in element:
        self._count_skip(element, skipped[row])
        continue
      if batch is None:
        batch = {name: np.empty((self.batch_size, *np.shape(value)), np.asarray(value).dtype)
                 for name, value in element.items()}
      for name, value in element.items():
        batch[name][row] = value
      row += 1
    return {**batch, SKIPPED: skipped}

  def _count_skip(self, element, counts):
    counts[records.SKIP_REASONS.index(element["_skip"])] += 1
    self.skipped += 1
    if element["_why"] not in self.logged:     # once per record, not once per epoch
      self.logged.add(element["_why"])
      logging.warning("skipped a record (%s): %s", element["_skip"], element["_why"])
    if self.seen >= self.min_seen and self.skipped > self.max_fraction * self.seen:
      raise records.DataError(too_many_skipped(self.directory, self.skipped, self.seen,
                                               self.max_fraction))

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class Batches(grain.IterDataset):
  """Batches of `batch_size` examples; skip markers are dropped and counted.

  Each record skipped is logged once. `batch["skipped"]` `[B, reasons]`
  holds, per row, the records dropped just before that row's example, so
  the batch's sum counts its skips (also from worker processes). Fails in
  one line once more than `max_fraction` of the `min_seen`+ records seen
  were bad. A partial batch at the end of the stream is dropped.

  Each example is copied into its row as it is decoded, while it is still
  in the cache: stacking 64 examples (17 MB at CC3M's shapes) once the
  batch was complete cost about 90 µs more a record (docs/performance.md §
  The input pipeline's overhead). In a worker process, Grain copies the
  batch into shared memory to hand it over."""

  def __init__(self, parent, batch_size: int, directory: str, min_seen: int = MIN_SEEN,
               max_fraction: float = 0.01):
    super().__init__(parent)
    self.batch_size, self.directory = batch_size, directory
    self.min_seen, self.max_fraction = min_seen, max_fraction

  def __iter__(self):
    return _BatchIterator(self._parent.__iter__(), self.batch_size, self.directory,
                          self.min_seen, self.max_fraction)

  def __str__(self) -> str:
    return f"Batches({self.batch_size}, {self.directory})"


class ProcessBlocks(grain.MapDataset):
  """Process `index`'s rows of each global batch of the parent stream.

  The global batch `k` is the parent's elements `[k · G, (k + 1) · G)` with
  `G = block · count`; process `index` holds rows `[index · block, (index +
  1) · block)` of it, exactly where `jax.make_array_from_process_local_data`
  puts them. So the global batches do not depend on the process count.
  Elements are `(parent position, parent element)`.
  """

  def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
    super().__init__(parent)
    self.block, self.index, self.count = block, index, count

  def __len__(self) -> int:
    return len(self._parent) // (self.block * self.count) * self.block

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.slice(i)
    batch, row = divmod(i, self.block)
    position = (batch * self.count + self.index) * self.block + row
    return position, self._parent[position]

  def __str__(self) -> str:
    return f"ProcessBlocks(block={self.block}, index={self.index}, count={self.count})"


def usable_shards(directory: str, max_skip_fraction: float) -> records.Shards:
  """The dataset's openable shards; each unusable one is logged by name, and
  `records.DataError` when they hold more than `max_skip_fraction` of it."""
  shards = records.Shards(directory)
  for shard in shards.unusable:
    logging.warning("skipped an unusable shard of %s: %s", directory, shard)
  if shards.lost > max_skip_fraction * shards.total or not shards.paths:
    raise records.DataError(
        f"{len(shards.unusable)} shards of {directory} cannot be read "
        f"({', '.join(shards.unusable[:3])}{', …' if len(shards.unusable) > 3 else ''}): "
        f"{shards.lost} of {shards.total} records, more than "
        f"config.data.max_skip_fraction={max_skip_fraction}; rebuild those shards "
        f"(delete them and their .json, rerun the build) or check with python -m "
        f"dinorank_jax.data.verify {os.path.normpath(directory)}")
  return shards


def make_dataset(directory: str, *, batch_size: int, image_size: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
                 num_epochs: int | None = None, num_records: int | None = None,
                 threads: int = 2, worker_count: int = 0, crop_scale=(0.5, 1.0),
                 syn_captions: bool = False, max_skip_fraction: float = 0.01,
                 min_seen: int = MIN_SEEN) -> grain.IterDataset:
  """The training stream over the dataset at `directory`; `iter()` of it is
  a checkpointable iterator (`get_state()` / `set_state()`).

  Args:
    batch_size: per-process batch (the global batch / process count).
    image_size: student and trunk input side.
    seed: shuffle and augmentation seed (the same on every process).
    shard_index, shard_count: this process (`jax.process_index()`,
      `jax.process_count()`); it reads its rows of every global batch
      (`ProcessBlocks`), so shares are disjoint, equal in size, and the
      global batches are the same for any process count.
    num_epochs: None for an endless stream; each epoch is reshuffled, and
      augmentations are drawn per stream position.
    num_records: train on the first `num_records` records only (subsets).
    threads: decoding threads (PIL releases the GIL while decoding); 1
      decodes in the prefetch thread itself (see the module docstring).
    worker_count: worker processes on top of the threads (0: none).
    syn_captions: batches carry `syn_tokens` (ALIP); records without are skipped.
    max_skip_fraction, min_seen: see `Batches`; also the bound on the
      records lost in unusable shards.
  """
  if worker_count and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()   # Grain's workers read absl flags; argparse programs parse none
  shards = usable_shards(directory, max_skip_fraction)
  ds = grain.MapDataset.source(RecordSource(shards))
  if num_records is not None:
    if num_records > len(ds):
      raise records.DataError(f"config.data.num_records={num_records}, but {directory} holds "
                              f"{len(ds)} records: set it to {len(ds)} or fewer, or leave it "
                              "unset (every record)")
    ds = ds[:num_records]
  ds = ds.seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ProcessBlocks(ds.repeat(num_epochs), batch_size, shard_index, shard_count)
  ds = ds.map(Decode(image_size, seed, crop_scale, syn_captions=syn_captions, shards=shards))
  pool = (grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * batch_size)
          if threads > 1 else grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  stream = Batches(ds.to_iter_dataset(pool), batch_size, directory, min_seen, max_skip_fraction)
  if worker_count:
    return stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  # The caller's thread only takes finished batches (and dispatches steps).
  return grain.experimental.ThreadPrefetchIterDataset(stream, prefetch_buffer_size=2)
