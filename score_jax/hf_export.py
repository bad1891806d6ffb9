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


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def export(params_path: str, like: str, out: str, dtype: str | None = None) -> list[str]:
    """Writes ``out``; returns the names of the files copied from ``like``.

    ``out`` is written as a sibling directory and renamed into place at the end, so a failed
    export leaves an older ``out`` (or none), never a half-written one; an ``out`` that is, holds
    or lies inside ``like`` or ``params`` is refused (it would overwrite or delete the source)."""
    if not hf.is_hf_checkpoint(like):
        raise ValueError(f"--like={like} is not a Hugging Face checkpoint directory (config.json + safetensors); "
                         "pass the checkpoint the run started from.")
    for name, source in (("--like", like), ("--params", params_path)):
        if _inside(out, source) or _inside(source, out):
            raise ValueError(f"--out={out} overlaps {name}={source}: writing it would overwrite or delete the "
                             "source weights; choose a directory outside both.")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype={dtype!r}; choose float32, bfloat16 or float16 (or leave it out: the params').")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out={out} is a file; pass a directory.")
    checkpoints.require_export(params_path, "params", "any training job writes <workdir>/export at its end")
    cfg = hf.config_from_hf(like)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1))
    params = checkpoints.load_params(params_path, learner.abstract_params(cfg, mesh))
    with open(os.path.join(like, "config.json")) as f:
        source = json.load(f)
    out = os.path.abspath(out)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.writing")
    if jax.process_index() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    hf.export(tmp, cfg, params, dtype=dtype, source_config=source)
    copied = []
    if jax.process_index() == 0:
        for name in COPIED:
            if os.path.exists(os.path.join(like, name)):
                shutil.copyfile(os.path.join(like, name), os.path.join(tmp, name))
                copied.append(name)
        old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.replaced")
        if os.path.exists(old):
            shutil.rmtree(old)
        if os.path.exists(out):
            os.rename(out, old)
        os.rename(tmp, out)
        if os.path.exists(old):
            shutil.rmtree(old)
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
    except (ValueError, OSError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {args.out} (weights, config.json; copied {', '.join(copied) or 'no tokenizer files'}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
