"""python -m dinorank_jax.convert import --from openai|open_clip|hf --checkpoint PATH --out DIR
                                      [--overwrite]

Writes the CLIP checkpoint at PATH (a `.safetensors`, `.pt`, `.pth` or `.bin`
file, or a directory holding one) as an export of ours at DIR. `--from`
names where it comes from: `openai` (OpenAI's weights, quick GELU),
`open_clip` (open_clip's LAION weights, exact GELU; `--quick_gelu` for its
`-quickgelu` models) or `hf` (a transformers `CLIPModel`, with its
`config.json`).
"""

import os

from dinorank_jax import errors, export
from dinorank_jax.convert import read


def _import(args) -> dict:
  export.check_out(os.path.abspath(args.out), args.overwrite)     # before reading the checkpoint
  arch = "openai" if args.source == "openai" or args.quick_gelu else "open_clip"
  model_config, params = read(args.checkpoint, arch,
                              layout="hf" if args.source == "hf" else "open_clip")
  model_config["source"]["from"] = args.source
  return export.write(args.out, model_config, params, overwrite=args.overwrite)


@errors.guard
def main(argv=None):
  p = errors.ArgumentParser(prog="python -m dinorank_jax.convert",
                            description=__doc__.split("\n\n")[1].replace("\n", " "))
  commands = p.add_subparsers(dest="command", required=True)
  i = commands.add_parser("import", help="a CLIP checkpoint -> an export of ours")
  i.add_argument("--from", dest="source", required=True, choices=("openai", "open_clip", "hf"),
                 help="the checkpoint's family (an open_clip_config.json beside it names the arch)")
  i.add_argument("--checkpoint", required=True, help="weight file, or a directory holding one")
  i.add_argument("--out", required=True, help="export directory to write")
  i.add_argument("--quick_gelu", action="store_true",
                 help="--from open_clip: a -quickgelu model (trained with quick GELU)")
  i.add_argument("--overwrite", action="store_true",
                 help="replace the export at --out (removing its open_clip/ and hf/ too)")
  args = p.parse_args(argv)
  model_config = _import(args)
  m = model_config["model"]
  print(f"imported {args.checkpoint} ({m['image_trunk']} image, {m['text_trunk']} text, "
        f"arch {m['arch']}) to {args.out}")


if __name__ == "__main__":
  main()
