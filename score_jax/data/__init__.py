"""Datasets: TFDS builders by name, and `prepare` to build one locally.

    builder = data.prepare("toy_arithmetic", "/tmp/tfds", seed=0)
    source = builder.as_data_source("train")   # then data.pipeline.sft_loader(source, ...)
    math = data.prepare("math", "/tmp/tfds", manual_dir="/data/MATH")
    train = math.as_data_source("train+test_minus_math500")

Task datasets (math, mbpp, humaneval, gsm8k) share the record fields id, prompt, answer and
response (see score_jax/data/manual.py); each module's docstring lists its splits, extra
fields and, for those built from files you provide, the files expected in `manual_dir`.
"""

import os

import tensorflow_datasets as tfds

from score_jax.data import gsm8k
from score_jax.data import humaneval
from score_jax.data import manual
from score_jax.data import math
from score_jax.data import mbpp
from score_jax.data import toy

BUILDERS = {
    "toy_arithmetic": toy.ToyArithmetic,
    "math": math.Math,
    "mbpp": mbpp.Mbpp,
    "humaneval": humaneval.HumanEval,
    "gsm8k": gsm8k.Gsm8k,
}


def needs_manual_dir(name: str) -> bool:
    """True if dataset `name` is built from files the user provides in a manual directory."""
    return issubclass(_builder_class(name), manual.ManualBuilder)


def prepare(name: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
            **kwargs) -> tfds.core.DatasetBuilder:
    """Builds dataset `name` under `data_dir` unless it is already there; returns its builder.

    `manual_dir` is where math, mbpp and gsm8k read their files (default
    `<data_dir>/downloads/manual/<TFDS name>`); None or "" for the others. Missing files fail
    before any work, naming what is expected there. `kwargs` go to the builder (for
    toy_arithmetic: seed, train_size, test_size, vocab_size). Safe to call again: an existing
    build is reused. Nothing is downloaded. Processes that share `data_dir` should not build
    at the same time; let one build first (builds are deterministic, so each process may also
    build into its own local directory).
    """
    cls = _builder_class(name)
    if manual_dir:
        if not issubclass(cls, manual.ManualBuilder):
            raise ValueError(f"Dataset {name!r} reads no manual files, but manual_dir="
                             f"{os.fspath(manual_dir)!r} was given; pass manual_dir=''.")
        kwargs["manual_dir"] = manual_dir
    builder = cls(data_dir=os.fspath(data_dir), **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder


def _builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
    if name not in BUILDERS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(BUILDERS)}.")
    return BUILDERS[name]
