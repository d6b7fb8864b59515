"""Builds an ArrayRecord corpus from images and captions.

    python -m dinorank_jax.data.build --source synthetic --out DIR [--num 20000] [--split val]
    python -m dinorank_jax.data.build --source tsv --input pairs.tsv --out DIR
    python -m dinorank_jax.data.build --source webdataset --input 'cc3m/{00000..00331}.tar' --out DIR

Sources: `synthetic` (dinorank_jax.data.synthetic); `tsv`/`csv`, a table with
a header naming an image-path column (`--image_column`, default `image`;
relative paths are read from the table's folder) and a caption column
(`--caption_column`, default `caption`), one optional `key` column; and
`webdataset`, tar shards as img2dataset writes them (`{key}.jpg` +
`{key}.txt`). `--input` takes a path, a glob or a brace pattern
(`cc3m/{00000..00331}.tar`, `{a,b}.tsv`), for tables as for tar shards; the
input is streamed, and at most `WINDOW_PER_WORKER` shards per worker are in
flight, so memory does not grow with the corpus.

Synthetic captions (for the ALIP baseline, `configs/alip.py`) come from a
table's `--syn_caption_column` (default `syn_caption`, used when the table
has it) or a `{key}.syn.txt` member of a webdataset sample; producing them
with a captioning model is the user's step (docs/data.md). A record gets
`syn_caption` and `syn_tokens` where its synthetic caption is not empty. Every image is decoded, converted to RGB, downscaled to a short
side of at most `--max_side` and re-encoded as JPEG. An unreadable image or
an empty caption is skipped, counted and logged with its key, the file or
tar member it came from, and why (`skipped KEY (SHARD.tar: KEY.jpg): corrupt
(cannot identify image file)`); the run ends with
`written N, skipped M (corrupt K, empty caption L)`. Inputs are cut into
shards of `--shard_size` in input order; a re-run skips finished shards.

A build records its arguments in `DIR/build.json`
(`records.claim_directory`); rerunning into the same `--out` with other
arguments is refused (`--overwrite` replaces the old dataset), so shards of
two different builds never mix. Captions of any length
are read (the tokens keep the first 77).
"""

import collections
import csv
import functools
import glob
import hashlib
import io
import itertools
import logging
import multiprocessing
import os
import re
import sys
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from PIL import Image
from tqdm import tqdm

from dinorank_jax import errors
from dinorank_jax.data import records, synthetic, tars
from dinorank_jax.data.tokenizer import CONTEXT_LENGTH, TextTokenizer

# The arguments that decide what a build writes (not how fast: --workers).
CONTENT_ARGS = ("source", "input", "image_column", "caption_column", "syn_caption_column",
                "num", "seed", "image_size", "max_side", "shard_size", "tokenizer")
csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))   # captions of any length
WINDOW_PER_WORKER = 2          # shards in flight per worker
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand(pattern: str) -> list[str]:
  """The files a `--input` names, in order: brace patterns as img2dataset
  users type them (`cc3m/{00000..00331}.tar`, zero padding kept; `{a,b}`
  lists), then shell globs (the files that exist); a plain path is itself,
  whether it exists or not (`named_inputs` refuses missing ones)."""
  found = _BRACES.search(pattern)
  if found:
    body = found[1]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
      first, last = span.groups()
      parts = [f"{i:0{len(first)}d}" for i in range(int(first), int(last) + 1)]
    else:
      parts = body.split(",")
    head, tail = pattern[:found.start()], pattern[found.end():]
    return [p for part in parts for p in expand(head + part + tail)]
  if any(c in pattern for c in "*?["):
    return sorted(glob.glob(pattern))
  return [pattern]


def named_inputs(pattern: str, what: str) -> list[str]:
  """`expand(pattern)`, every file of it present: a brace pattern or path
  naming a file that is missing is refused, so no input is left out unsaid."""
  paths = expand(pattern)
  missing = [p for p in paths if not os.path.isfile(p)]
  if not paths or len(missing) == len(paths):
    raise errors.UserError(f"no {what} match --input {pattern!r} (a path, a glob or a brace "
                           "pattern such as 'cc3m/{00000..00331}.tar')")
  if missing:
    raise errors.UserError(
        f"{len(missing)} of the {len(paths)} {what} --input names are missing "
        f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}): fix --input, or give "
        "a glob (such as 'cc3m/*.tar') to take the ones that exist")
  return paths


def _inputs(args) -> list[str]:
  return named_inputs(args.input, "tar shards" if args.source == "webdataset" else "tables")


def fingerprint(paths: list[str]) -> str:
  """A content identity of the input files: SHA-256 of their names, sizes
  and modification times (regenerated inputs under the same names differ)."""
  digest = hashlib.sha256()
  for path in paths:
    stat = os.stat(path)
    digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()


class Skip(Exception):
  """An input that cannot become a record; `reason` is `corrupt` or
  `empty_caption`, `why` says more for the log."""

  def __init__(self, reason, why=""):
    super().__init__(reason)
    self.reason, self.why = reason, why


def _utf8(caption: str) -> str:
  """`caption` (decoded with `surrogateescape`) with its spaces collapsed;
  `Skip` when it held bytes that are not UTF-8, rather than storing U+FFFD."""
  try:
    caption.encode("utf-8")
  except UnicodeEncodeError:
    raise Skip("corrupt", "caption is not UTF-8") from None
  return " ".join(caption.split())


def reencode(image_bytes: bytes, max_side: int, quality: int = 90) -> bytes:
  """JPEG bytes of the image with its short side at most `max_side`."""
  if not image_bytes:
    raise Skip("corrupt", "no image data")
  try:
    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    image = image.convert("RGB")
  except Exception as e:  # PIL raises many types for bad bytes
    why = re.sub(r" ?<_io\.BytesIO object at \w+>", "", " ".join(str(e).split()))
    raise Skip("corrupt", why or type(e).__name__) from e
  short = min(image.size)
  if short > max_side:
    scale = max_side / short
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         Image.BICUBIC)
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=quality)
  return out.getvalue()


# Each source yields cheap descriptors; `load` turns one into `(key, image
# bytes, caption, extra fields, origin)`, in the shard's worker. `origin`
# names the input for a skip's log line: the image file, or the tar member.

def synthetic_source(args, damaged):
  del damaged
  return range(args.num), functools.partial(_load_synthetic, args.seed, args.image_size)


def _load_synthetic(seed, size, index):
  return (*synthetic.example(seed, index, size), f"synthetic example {index}")


def table_source(args, damaged):
  del damaged                  # a table that does not parse stops the build, naming it
  return _table_items(args, _inputs(args)), _load_file


def _table_items(args, paths):
  """Rows of every table, streamed (`(key, image path, caption, syn caption)`)."""
  delimiter = "\t" if args.source == "tsv" else ","
  index = 0
  for path in paths:
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
      reader = csv.DictReader(f, delimiter=delimiter)
      for column in (args.image_column, args.caption_column):
        if reader.fieldnames and column not in reader.fieldnames:
          raise errors.UserError(f"{path} has no column {column!r} (columns: "
                                 f"{reader.fieldnames}); set --image_column / --caption_column")
      for row in reader:
        yield (row.get("key") or f"{index:09d}", os.path.join(folder, row[args.image_column]),
               row[args.caption_column], row.get(args.syn_caption_column) or "")
        index += 1


def _load_file(item):
  key, path, caption, syn_caption = item
  origin = path
  try:
    with open(path, "rb") as f:
      image = f.read()
  except OSError as e:
    image, origin = b"", f"{path}: {e.strerror}"
  return key, image, caption, {"syn_caption": syn_caption}, origin


def webdataset_source(args, damaged):
  return webdataset_items(_inputs(args), damaged), _identity


def webdataset_items(paths, damaged: list):
  """The samples of the tar shards `paths`, in order. A shard that is not a
  tar, or that ends before its end-of-archive marker (cut short), is logged
  and appended to `damaged` as `{"file", "why"}`; the samples read before
  the damage are kept."""
  for path in paths:
    group, current = {}, None
    try:
      with tarfile.open(path) as tar:
        for member in tars.members(tar):
          if not member.isfile():
            continue
          key, _, ext = member.name.rpartition("/")[2].partition(".")
          if key != current and group:
            yield _webdataset_item(path, current, group)
            group = {}
          current = key
          group[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
      if isinstance(e, OSError) and errors.one_line(e):
        raise
      why = " ".join(str(e).split()) or type(e).__name__
      damaged.append({"file": path, "why": why})
      logging.warning("%s is damaged (%s): the samples after the damage are missing", path, why)
    if group:
      yield _webdataset_item(path, current, group)


def _webdataset_item(path, key, group):
  ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in group), None)
  origin = f"{path}: {key}.{ext}" if ext else f"{path}: {key} (no .jpg, .png or .webp member)"
  text = lambda ext: group.get(ext, b"").decode("utf-8", errors="surrogateescape")
  return key, group.get(ext, b""), text("txt"), {"syn_caption": text("syn.txt")}, origin


def _identity(item):
  return item


SOURCES = {"synthetic": synthetic_source, "tsv": table_source, "csv": table_source,
           "webdataset": webdataset_source}


def _shard_records(items, load, max_side):
  """Records of one shard (without tokens) and its statistics: skips, and
  how many records carry a synthetic caption."""
  out, stats = [], {"corrupt": 0, "empty_caption": 0, "syn_caption": 0, "skipped_keys": []}
  for item in items:
    key, image, caption, extra, origin = load(item)
    try:
      caption = _utf8(caption)
      if not caption:
        raise Skip("empty_caption")
      syn_caption = _utf8(extra.pop("syn_caption", ""))
      if syn_caption:
        extra["syn_caption"] = syn_caption
        stats["syn_caption"] += 1
      out.append({"key": key, "jpeg": reencode(image, max_side), "caption": caption, **extra})
    except Skip as skip:
      stats[skip.reason] += 1
      stats["skipped_keys"].append(key)
      logging.warning("skipped %s (%s): %s%s", key, origin, skip.reason,
                      f" ({skip.why})" if skip.why else "")
  return out, stats


@functools.lru_cache(maxsize=1)
def _tokenizer(tokenizer_dir):
  """One tokenizer per worker process (building CLIP's BPE takes ~0.3 s)."""
  return TextTokenizer(tokenizer_dir)


def _build_shard(directory, index, items, load, max_side, tokenizer_dir):
  recs, stats = _shard_records(items, load, max_side)
  if recs:
    tokenizer = _tokenizer(tokenizer_dir)
    for r, t in zip(recs, tokenizer([r["caption"] for r in recs], CONTEXT_LENGTH)):
      r["tokens"] = t
    described = [r for r in recs if "syn_caption" in r]
    if described:
      for r, t in zip(described, tokenizer([r["syn_caption"] for r in described],
                                           CONTEXT_LENGTH)):
        r["syn_tokens"] = t
  return records.write_shard(directory, index, recs, stats)


def _content(args) -> dict:
  """What decides the dataset: the content arguments and, for files, a
  fingerprint of the inputs themselves."""
  out = {k: getattr(args, k) for k in CONTENT_ARGS}
  for k in ("input", "tokenizer"):
    if out[k] and not any(c in out[k] for c in "*?[{"):
      out[k] = os.path.abspath(out[k])
  if args.source == "synthetic":
    out.pop("input")
  else:
    for k in ("num", "seed", "image_size"):
      out.pop(k)
    out["inputs"] = fingerprint(_inputs(args))
  return out


def _in_order(pool, tasks, window: int):
  """The results of `tasks` (`(fn, *args)` to submit, or a finished shard's
  sidecar) in order, with at most `window` of them submitted and not yet
  collected: the input is read only as fast as shards are written, so memory
  stays bounded whatever the corpus size."""
  pending = collections.deque()
  collect = lambda x: x if isinstance(x, dict) else x.result()
  for task in tasks:
    pending.append(task if isinstance(task, dict) else pool.submit(*task))
    if len(pending) >= window:
      yield collect(pending.popleft())
  while pending:
    yield collect(pending.popleft())


def build(args) -> dict:
  """Builds (or resumes) the dataset at `args.out`; returns its metadata."""
  records.claim_directory(args.out, {"command": "data.build", **_content(args)}, args.overwrite)
  damaged = []
  items, load = SOURCES[args.source](args, damaged)
  chunks = iter(lambda it=iter(items): list(itertools.islice(it, args.shard_size)), [])
  tokenizer = _tokenizer(args.tokenizer)
  # Spawned, not forked: forking a process that runs JAX's threads can deadlock.
  pool = (ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
          if args.workers > 1 else ThreadPoolExecutor(1))
  tasks = (records.read_sidecar(args.out, index)   # a finished shard
           or (_build_shard, args.out, index, chunk, load, args.max_side, args.tokenizer)
           for index, chunk in enumerate(chunks))
  with pool:
    sidecars = list(tqdm(_in_order(pool, tasks, WINDOW_PER_WORKER * max(args.workers, 1)),
                         desc=f"building {args.out}", unit="shard"))
  counts = {k: sum(s.get(k, 0) for s in sidecars)
            for k in ("count", "corrupt", "empty_caption", "syn_caption")}
  meta = {
      "schema_version": records.SCHEMA_VERSION, "source": args.source,
      "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
      "eot_id": tokenizer.eot_id, "context_length": CONTEXT_LENGTH,
      "image_max_side": args.max_side, "teacher": None,
      "counts": {"written": counts["count"], "corrupt": counts["corrupt"],
                 "empty_caption": counts["empty_caption"], "syn_caption": counts["syn_caption"]},
      "shards": [{"file": s["file"], "count": s["count"]} for s in sidecars],
  }
  if args.source == "synthetic":
    meta["zero_shot_tasks"] = synthetic.TASKS
  if damaged:
    meta["damaged_inputs"] = damaged
  records.write_json(os.path.join(args.out, records.METADATA), meta)
  skipped = counts["corrupt"] + counts["empty_caption"]
  print(f"written {counts['count']}, skipped {skipped} (corrupt {counts['corrupt']}, "
        f"empty caption {counts['empty_caption']}); {counts['syn_caption']} with a synthetic "
        "caption" + (f"; {len(damaged)} damaged input(s), their samples after the damage "
                     f"missing: {', '.join(d['file'] for d in damaged)} (metadata.json's "
                     "damaged_inputs)" if damaged else ""))
  return meta


def parser():
  p = errors.ArgumentParser(prog="python -m dinorank_jax.data.build",
                            description=__doc__.split("\n")[0])
  p.add_argument("--source", required=True, choices=sorted(SOURCES), help="where the pairs come from")
  p.add_argument("--out", required=True, help="dataset directory to write")
  p.add_argument("--input", help="table file (tsv/csv) or tar glob (webdataset)")
  p.add_argument("--image_column", default="image", help="tables: the image-path column")
  p.add_argument("--caption_column", default="caption", help="tables: the caption column")
  p.add_argument("--syn_caption_column", default="syn_caption",
                 help="synthetic-caption column (ALIP), used when the table has it")
  p.add_argument("--num", type=int, default=20000, help="synthetic: number of pairs")
  p.add_argument("--seed", type=int, default=0, help="synthetic: corpus seed (one per split)")
  p.add_argument("--image_size", type=int, default=96, help="synthetic: image side")
  p.add_argument("--max_side", type=int, default=256, help="bound on the stored short side")
  p.add_argument("--shard_size", type=int, default=2048, help="records per shard")
  p.add_argument("--workers", type=int, default=os.cpu_count(),
                 help="processes decoding and re-encoding images (default: the cores)")
  p.add_argument("--tokenizer", default=None, help="local Hugging Face tokenizer directory "
                 "(default: CLIP's BPE)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace a dataset in --out that was built with other arguments")
  return p


@errors.guard
def main(argv=None):
  args = parser().parse_args(argv)
  if args.source != "synthetic" and not args.input:
    raise SystemExit(f"--source {args.source} needs --input")
  for flag in ("num", "image_size", "max_side", "shard_size", "workers"):
    if getattr(args, flag) < 1:
      raise errors.UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
  errors.check_output_directory(args.out, "--out")
  build(args)


if __name__ == "__main__":
  main()
