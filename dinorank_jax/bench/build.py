"""Build benchmark: the webdataset builder's peak memory and pairs/s as the corpus grows.

    python -m dinorank_jax.bench --suite build [--build_pairs 2048] [--build_scales 1,4,16]

Writes synthetic tar shards in img2dataset's layout (`{key}.jpg` + `{key}.txt`,
128 pairs a tar, JPEGs of 384 × 384 synthetic scenes, so the
builder downscales every image to its 256 px short side) for `pairs × scale`
pairs at each scale, then measures, at each scale in one run:

* bare: the same tars read and every image decoded and re-encoded
  (`build.reencode`) by as many spawned processes as the build has workers,
  one task per tar; no tokenizer, no records written: the practical limit;
* build: `python -m dinorank_jax.data.build --source webdataset` on the
  brace pattern of those tars, in a child process whose process tree's
  resident memory is sampled every 10 ms; the peak of the sum is reported.

Both rates run from the start of the work (pool start-up included) to its
last result; the build's is timed inside its child, so the interpreter's
imports are not counted.

Targets (issue 20): peak RSS flat (the largest scale ≤ 1.2 × the smallest)
and the build at ≥ 90 % of the bare loop's pairs/s at every scale.
"""

import io
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import psutil

from dinorank_jax.bench import against
from dinorank_jax.data import build, synthetic

SIDE = 384                        # input images; the builder stores 256 px
MAX_SIDE = 256
RSS_TARGET, RATE_TARGET = 1.2, 0.9
# The child: a timed build, its metadata's count and seconds as one JSON line.
_CHILD = ("import json, sys, time\n"
          "from dinorank_jax.data import build\n"
          "start = time.perf_counter()\n"
          "meta = build.build(build.parser().parse_args(sys.argv[1:]))\n"
          "print(json.dumps({'written': meta['counts']['written'],"
          " 'seconds': time.perf_counter() - start}))\n")


def write_tars(directory: str, num_tars: int, pairs_per_tar: int, distinct: int) -> list[str]:
  """`num_tars` tar shards `00000.tar`, …; their images cycle through
  `distinct` rendered scenes (every key and caption is its own)."""
  scenes = [synthetic.example(0, i, SIDE) for i in range(distinct)]
  jpegs = [build.reencode(image, SIDE) for _, image, _, _ in scenes]
  paths = []
  for t in range(num_tars):
    path = os.path.join(directory, f"{t:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for j in range(pairs_per_tar):
        n = t * pairs_per_tar + j
        key = f"{n:09d}"
        caption = f"{scenes[n % distinct][2]} (pair {n})".encode()
        for name, data in ((f"{key}.jpg", jpegs[n % distinct]), (f"{key}.txt", caption)):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    paths.append(path)
  return paths


def _reencode_tar(path: str) -> int:
  count = 0
  for _, image, _, _, _ in build.webdataset_items([path], damaged=[]):
    build.reencode(image, MAX_SIDE)
    count += 1
  return count


def bare_loop(paths: list[str], workers: int) -> float:
  """Pairs/s of reading the tars and re-encoding every image, nothing else."""
  start = time.perf_counter()
  with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    count = sum(pool.map(_reencode_tar, paths))
  return count / (time.perf_counter() - start)


def timed_build(pattern: str, out: str, workers: int, shard_size: int) -> dict:
  """Runs the builder in a child process: pairs written, pairs/s and the
  peak resident memory of its process tree (MiB)."""
  child = subprocess.Popen(
      [sys.executable, "-c", _CHILD, "--source", "webdataset", "--input", pattern,
       "--out", out, "--workers", str(workers), "--shard_size", str(shard_size),
       "--max_side", str(MAX_SIDE)],
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  root, peak = psutil.Process(child.pid), 0
  while child.poll() is None:
    try:
      tree = [root, *root.children(recursive=True)]
      peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
    except psutil.Error:          # a worker exited between listing and reading
      pass
    time.sleep(0.01)
  output = child.stdout.read()
  if child.returncode:
    raise RuntimeError(f"the benchmarked build failed (exit {child.returncode})")
  result = json.loads(output.strip().splitlines()[-1])
  return {"written": result["written"], "build_pairs_s": result["written"] / result["seconds"],
          "peak_rss_mib": peak / 2 ** 20}


def run(*, pairs=2048, scales=(1, 4, 16), pairs_per_tar=128, shard_size=256,
        workers=None, distinct=64) -> dict:
  """One row per scale (pairs, shards, peak RSS, build and bare pairs/s) and
  the verdicts."""
  workers = workers or os.cpu_count()
  pairs_per_tar = min(pairs_per_tar, pairs)
  if pairs % pairs_per_tar:
    raise ValueError(f"--build_pairs {pairs} is not a multiple of {pairs_per_tar} pairs a tar")
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    paths = write_tars(directory, max(scales) * pairs // pairs_per_tar, pairs_per_tar, distinct)
    for scale in scales:
      chosen = paths[:scale * pairs // pairs_per_tar]
      pattern = os.path.join(directory, f"{{00000..{len(chosen) - 1:05d}}}.tar")
      for path in chosen:
        with open(path, "rb") as f:
          f.read()                                  # warm the page cache for both loops
      bare = bare_loop(chosen, workers)
      built = timed_build(pattern, os.path.join(directory, f"out-{scale}"), workers, shard_size)
      if built["written"] != scale * pairs:
        raise RuntimeError(f"the build wrote {built['written']} of {scale * pairs} pairs")
      rows.append({"scale": scale, "pairs": scale * pairs, "tars": len(chosen), **built,
                   "bare_pairs_s": bare, "of_bare": built["build_pairs_s"] / bare})
  rss_ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
  return {"workers": workers, "rows": rows, "rss_ratio": rss_ratio,
          "rss_met": rss_ratio <= RSS_TARGET,
          "rate_met": all(r["of_bare"] >= RATE_TARGET for r in rows)}


def format_table(result: dict, title: str) -> str:
  lines = [title, f"{'scale':>5}{'pairs':>8}{'tars':>6}{'peak RSS MiB':>14}{'build pairs/s':>15}"
                  f"{'bare pairs/s':>14}{'of bare':>9}"]
  for r in result["rows"]:
    lines.append(f"{r['scale']:>4}x{r['pairs']:>8}{r['tars']:>6}{r['peak_rss_mib']:>14.0f}"
                 f"{r['build_pairs_s']:>15.0f}{r['bare_pairs_s']:>14.0f}{against(r['of_bare'], RATE_TARGET):>9}")
  verdict = lambda met: "met" if met else "MISSED"
  lines.append(f"peak RSS {result['rows'][-1]['scale']}x / {result['rows'][0]['scale']}x: "
               f"{against(result['rss_ratio'], RSS_TARGET)} [{verdict(result['rss_met'])}] target <= {RSS_TARGET}; "
               f"build of bare at every scale [{verdict(result['rate_met'])}] target >= "
               f"{RATE_TARGET}")
  return "\n".join(lines)
