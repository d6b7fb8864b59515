"""Checks a dataset end to end: every shard opens, every record reads, decodes
and fits `metadata.json`, as the training pipeline would see it.

    python -m dinorank_jax.data.verify DIR [--syn_captions] [--show 20]

Prints the counts per skip reason (`records.SKIP_REASONS`, the same as the
trainer's `data/skipped_*` metrics), the unusable shards, and the first
`--show` bad records with their shard, index, key and why. Exits 0 when every
record is usable, 1 otherwise.
"""

import collections
import sys

from tqdm import tqdm

from dinorank_jax import errors
from dinorank_jax.data import records
from dinorank_jax.data.pipeline import Decode, RecordSource


def verify(directory: str, *, syn_captions: bool = False, log=print, show: int = 20) -> dict:
  """`{"records", "ok", "unusable_shards", "lost", "skipped": {reason: n}, "bad": [...]}`."""
  shards = records.Shards(directory)
  source = RecordSource(shards)
  decode = Decode(16, augment=False, syn_captions=syn_captions, shards=shards)
  skipped, bad = collections.Counter(), []
  for index in tqdm(range(len(source)), desc=f"verifying {directory}", unit="record",
                    file=sys.stderr):
    example = decode.map((index, source[index]))
    if "_skip" in example:
      skipped[example["_skip"]] += 1
      bad.append(f"{example['_skip']}: {example['_why']}")
  result = {"records": shards.total, "ok": len(source) - sum(skipped.values()),
            "unusable_shards": shards.unusable, "lost": shards.lost,
            "skipped": {r: skipped[r] for r in records.SKIP_REASONS}, "bad": bad}
  counts = ", ".join(f"{r} {n}" for r, n in result["skipped"].items())
  log(f"{directory}: {result['records']} records, {result['ok']} usable; skipped "
      f"{sum(skipped.values())} ({counts}); {len(shards.unusable)} unusable shards "
      f"({shards.lost} records)")
  for shard in shards.unusable:
    log(f"  unusable shard: {shard}")
  for line in bad[:show]:
    log(f"  {line}")
  if len(bad) > show:
    log(f"  … and {len(bad) - show} more (--show)")
  return result


@errors.guard
def main(argv=None):
  p = errors.ArgumentParser(prog="python -m dinorank_jax.data.verify",
                            description=" ".join(__doc__.split("\n\n")[0].split()))
  p.add_argument("directory", help="dataset directory (metadata.json and shards)")
  p.add_argument("--syn_captions", action="store_true",
                 help="also require synthetic captions (ALIP's corpora)")
  p.add_argument("--show", type=int, default=20, help="bad records to list")
  args = p.parse_args(argv)
  result = verify(args.directory, syn_captions=args.syn_captions, show=args.show)
  if result["ok"] < result["records"]:
    sys.exit(1)


if __name__ == "__main__":
  main()
