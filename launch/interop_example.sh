#!/usr/bin/env bash
# The worked example of docs/interop.md on the demo corpus, on the CPU:
# start from a CLIP checkpoint, fine-tune it with the order-3 objective and
# both students, hand it to open_clip, evaluate both ways.
#
#   launch/interop_example.sh [OUT]        (default OUT: runs/interop; 7.4 min on 2 CPU cores)
#
# Run it from the repository root (step 5 imports tests/open_clip_cpu.py).
#
# Nothing is downloaded, so the "public checkpoint" is made here: a CLIP
# (order 0, no students, OpenAI's trunk layout) trained on the demo corpus
# and written in open_clip's format. With real weights, start at step 2 with
# --checkpoint pointing at them. Knobs (environment):
#   PYTHON   interpreter with dinorank_jax installed (default: .venv/bin/python)
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
out=${1:-runs/interop}
demo=(--config configs/demo.py --config.model.arch=openai)

# 1. The stand-in for a public checkpoint: CLIP, 5 epochs (320 steps).
"$py" -m dinorank_jax.main "${demo[@]}" --workdir "$out/clip" --config.epochs=5 \
  --config.model.students=none --config.model.rank_order=0
"$py" -m dinorank_jax.export --workdir "$out/clip" --out "$out/clip_export" --format open_clip

# 2. Import it as OpenAI's weights are imported.
"$py" -m dinorank_jax.convert import --from openai \
  --checkpoint "$out/clip_export/open_clip/open_clip_model.safetensors" --out "$out/imported"

# 3. Fine-tune: order 3, both students and fusion, 5 epochs (320 steps), trunks from step 2.
"$py" -m dinorank_jax.main "${demo[@]}" --workdir "$out/finetune" --config.epochs=5 \
  --config.init_from="$out/imported"

# 4. Export (ours, and open_clip's format) and evaluate with our evaluator.
"$py" -m dinorank_jax.export --workdir "$out/finetune" --out "$out/finetune_export" \
  --format open_clip
"$py" -m dinorank_jax.evaluate --model "$out/imported,$out/finetune_export" \
  --suite records:data/demo/val --out "$out/report"

# 5. Load the open_clip export in open_clip and evaluate it with the same
#    suite: its trunks alone, without the students and fusion. (These
#    machines' torchvision does not load with CPU torch: the loader of
#    tests/open_clip_cpu.py stands in for it when it must.)
"$py" - "$out" <<'PY'
import json, sys
import numpy as np, torch
from dinorank_jax.data.tokenizer import TextTokenizer
from dinorank_jax.evaluate import suites
from dinorank_jax.models.vit import IMAGE_MEAN, IMAGE_STD
from tests.open_clip_cpu import import_open_clip

out = sys.argv[1]
open_clip = import_open_clip()
model = open_clip.create_model(f"local-dir:{out}/finetune_export/open_clip").eval()

class InOpenClip:
  """The evaluator's model interface around an open_clip model."""
  image_size, has_image_student, tokenizer = 32, False, TextTokenizer()

  def encode_image(self, images):
    x = (np.asarray(images, np.float32) / 255 - IMAGE_MEAN) / IMAGE_STD
    with torch.no_grad():
      return model.encode_image(torch.from_numpy(x).permute(0, 3, 1, 2).float(),
                                normalize=True).numpy()

  def encode_text(self, texts):
    tokens = torch.from_numpy(np.asarray(self.tokenizer(list(texts), 77), np.int64))
    with torch.no_grad():
      return model.encode_text(tokens, normalize=True).numpy()

result = suites.run("records:data/demo/val", InOpenClip(), "")
print(json.dumps({k: round(v, 4) for k, v in result["metrics"].items()
                  if k.startswith(("zero_shot", "retrieval"))}, indent=1))
PY
