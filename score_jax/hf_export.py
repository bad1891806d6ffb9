"""Write a trained policy as a Hugging Face checkpoint that transformers loads and vLLM serves.

    python -m score_jax.hf_export --params=runs/stage2_gemma2-2b/export \\
        --like=checkpoints/gemma2-2b --out=runs/stage2_gemma2-2b/hf [--dtype=bfloat16]

``--like`` is the Hugging Face checkpoint the run started from: its config.json gives the
architecture (and token ids), and its tokenizer and generation files are copied next to the
new weights, so ``--out`` is a complete checkpoint directory. On a pod, run it on every host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import jax

from score_jax import checkpoints, hf, learner, sharding

# Files of a checkpoint directory that are not weights and describe how to use them.
COPIED = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
          "generation_config.json", "chat_template.jinja")


def export(params_path: str, like: str, out: str, dtype: str | None = None) -> list[str]:
    """Writes ``out``; returns the names of the files copied from ``like``."""
    if not hf.is_hf_checkpoint(like):
        raise ValueError(f"--like={like} is not a Hugging Face checkpoint directory (config.json + safetensors); "
                         "pass the checkpoint the run started from.")
    checkpoints.require_export(params_path, "params", "any training job writes <workdir>/export at its end")
    cfg = hf.config_from_hf(like)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1))
    params = checkpoints.load_params(params_path, learner.abstract_params(cfg, mesh))
    with open(os.path.join(like, "config.json")) as f:
        source = json.load(f)
    hf.export(out, cfg, params, dtype=dtype, source_config=source)
    copied = []
    if jax.process_index() == 0:
        for name in COPIED:
            if os.path.exists(os.path.join(like, name)):
                shutil.copyfile(os.path.join(like, name), os.path.join(out, name))
                copied.append(name)
    return copied


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", required=True, help="a params export (<run>/export or <run>/best)")
    p.add_argument("--like", required=True, help="the Hugging Face checkpoint the run started from")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--dtype", default=None, help="dtype of the written tensors (default: the params')")
    args = p.parse_args(argv)
    try:
        copied = export(args.params, args.like, args.out, args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {args.out} (weights, config.json; copied {', '.join(copied) or 'no tokenizer files'}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
