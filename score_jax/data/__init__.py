"""Datasets: TFDS builders by name, and `prepare` to build one locally.

    builder = data.prepare("toy_arithmetic", "/tmp/tfds", seed=0)
    source = builder.as_data_source("train")   # then data.pipeline.sft_loader(source, ...)
"""

import os

import tensorflow_datasets as tfds

from score_jax.data import toy

BUILDERS = {"toy_arithmetic": toy.ToyArithmetic}


def prepare(name: str, data_dir: str | os.PathLike, **kwargs) -> tfds.core.DatasetBuilder:
    """Builds dataset `name` under `data_dir` unless it is already there; returns its builder.

    `kwargs` go to the builder (for toy_arithmetic: seed, train_size, test_size, vocab_size).
    Safe to call again: an existing build is reused. Nothing is downloaded. Processes that
    share `data_dir` should not build at the same time; let one build first (the toy task is
    deterministic, so each process may also build into its own local directory).
    """
    if name not in BUILDERS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(BUILDERS)}.")
    builder = BUILDERS[name](data_dir=os.fspath(data_dir), **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder
