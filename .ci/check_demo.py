"""Fails unless the demo learned and its evaluation agrees with training's:
zero-shot colour accuracy at least 3x chance (8 colours) in the trainer's
final held-out evaluation, the same accuracy (to one scene in 500) from the
exported model in reports/demo (and in its CLIP_benchmark record, as acc1),
and the report's three figures of one model written (the order sweep needs
two rank orders)."""

import json
import os
import sys

metrics_file, report_dir = sys.argv[1:3]
with open(metrics_file) as f:
  final = [json.loads(line) for line in f if "zero_shot/colour" in line][-1]
accuracy, floor = final["zero_shot/colour"], 3 / 8
with open(os.path.join(report_dir, "results.json")) as f:
  results = json.load(f)
synthetic = results["models"]["demo"]["suites"]["synthetic"]
exported = synthetic["metrics"]["zero_shot/colour/top1"]
figures = [f for f in results["figures"] if os.path.getsize(os.path.join(report_dir, f)) > 1000]
named = [json.load(open(os.path.join(report_dir, f))) for f in results["clip_benchmark"]]
acc1 = next(r["metrics"]["acc1"] for r in named if r["dataset"] == "synthetic/colour")
print(f"demo: zero-shot colour {accuracy:.3f} in training, {exported:.3f} from the export "
      f"(3x chance = {floor:.3f}; CLIP_benchmark acc1 {acc1:.3f}); figures: {', '.join(figures)}")
sys.exit(0 if accuracy >= floor and abs(exported - accuracy) <= 0.002 and len(figures) == 3
         and acc1 == exported else 1)
