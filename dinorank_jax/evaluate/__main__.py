"""Evaluates exported models and writes the report.

    python -m dinorank_jax.evaluate --model exports/r3[,exports/r1,…] --suite synthetic \
        --data_dir data/demo --out reports/demo
    python -m dinorank_jax.evaluate --compare reports/r1 reports/r3 --out reports/sweep

`--suite` takes names and groups of `suites` (comma-separated); `--compare`
merges earlier reports without loading a model. Prints the Markdown report;
`--out` holds `results.json`, `report.md` and the figures.
"""

import os
import sys

from dinorank_jax import compilation, errors, export
from dinorank_jax.evaluate import metrics, report, suites


def evaluate_models(paths: list[str], names: list[str], data_dir: str, *, batch_size: int,
                    probe_limit: int, dtype: str = "float32", log=print) -> dict:
  models = {}
  for path in paths:
    model = export.load(path, batch_size=batch_size, dtype=dtype)
    name = os.path.basename(os.path.normpath(path))
    entry = {"path": os.path.abspath(path), "model": model.config, "suites": {}}
    for suite in names:
      log(f"{name}: {suite} …")
      try:
        entry["suites"][suite] = suites.run(suite, model, data_dir, batch_size=batch_size,
                                            probe_limit=probe_limit)
      except metrics.InvalidEmbeddings as e:
        raise errors.UserError(f"{name}: suite {suite}: {e}") from None
      result = entry["suites"][suite]
      if result["status"] == "ok":
        result["dtype"] = model.dtype
        log(f"{name}: {suite}: ok, {result['examples']} examples, {result['skipped']} skipped")
      else:
        log(f"{name}: {suite}: {result['status']}")
    models[name] = entry
  return {"models": models, "data_dir": os.path.abspath(data_dir), "suites": names}


@errors.guard
def main(argv=None):
  p = errors.ArgumentParser(prog="python -m dinorank_jax.evaluate",
                            description=__doc__.split("\n")[0])
  p.add_argument("--model", help="export directories (python -m dinorank_jax.export), comma-separated")
  p.add_argument("--suite", default="synthetic",
                 help=f"comma-separated: {', '.join(suites.NAMED)}, records:DIR, folder:DIR, wds:DIR, probe:NAME")
  p.add_argument("--data_dir", default="data", help="where datasets are looked for")
  p.add_argument("--out", required=True, help="report directory to write")
  p.add_argument("--compare", nargs="+", metavar="REPORT", help="earlier report directories")
  p.add_argument("--batch_size", type=int, default=256, help="images or texts per jitted call")
  p.add_argument("--dtype", default="float32", choices=export.DTYPES,
                 help="compute dtype of the towers (float32, as open_clip and CLIP_benchmark "
                      "evaluate; bfloat16 is faster and moves embeddings by about 1e-2)")
  p.add_argument("--probe_limit", type=int, default=suites.PROBE_LIMIT,
                 help="training examples a linear probe embeds at most")
  compilation.add_cache_flags(p)
  args = p.parse_args(argv)
  if bool(args.model) == bool(args.compare):
    p.error("give --model (to evaluate) or --compare (to merge reports), not both")
  errors.check_output_directory(args.out, "--out")     # before any suite runs
  if args.compare:
    results = report.merge(args.compare)
  else:
    compilation.use_cache_from_flags(args)
    try:
      names = suites.expand(args.suite.split(","))
    except ValueError as e:
      p.error(str(e))
    missing = [m for m in args.model.split(",") if not os.path.isfile(
        os.path.join(m, export.CONFIG_FILE))]
    if missing:
      p.error(f"no export at {missing[0]}: write one with python -m dinorank_jax.export "
              "--workdir RUN --out DIR")
    results = evaluate_models(args.model.split(","), names, args.data_dir,
                              batch_size=args.batch_size, probe_limit=args.probe_limit,
                              dtype=args.dtype, log=lambda s: print(s, file=sys.stderr))
  results = report.write(results, args.out)
  print(report.markdown(results))
  print(f"wrote {os.path.join(args.out, 'report.md')} and {os.path.join(args.out, report.RESULTS)}",
        file=sys.stderr)
  if not args.compare:
    statuses = [r["status"] for m in results["models"].values() for r in m["suites"].values()]
    if "ok" not in statuses:
      raise errors.UserError(f"nothing was evaluated: every suite was skipped ({statuses[0]}); "
                             f"check --data_dir {args.data_dir} and --suite {args.suite}")


if __name__ == "__main__":
  main()
