"""Fails unless the demo's final evaluation shows learning: zero-shot colour
accuracy at least 3x chance (8 colours)."""

import json
import sys

with open(sys.argv[1]) as f:
  final = [json.loads(line) for line in f if "zero_shot/colour" in line][-1]
accuracy, floor = final["zero_shot/colour"], 3 / 8
print(f"demo: zero-shot colour {accuracy:.3f} (3x chance = {floor:.3f})")
sys.exit(0 if accuracy >= floor else 1)
