"""CIFAR-10 from tfds' catalogue, prepared in ``data.data_dir`` (downloaded only with ``data.download``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow_datasets as tfds

from ssl_ad.data.split import DataSettings, ImageSplit, builder_split
from ssl_ad.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class Cifar10Settings(DataSettings):
    """The ``data.*`` keys of cifar10 and their defaults (plus ``data_dir``)."""

    download: bool = False  # download and prepare when not prepared (needs the network)


def load_cifar10(data_cfg: Any, split: str) -> ImageSplit:
    """The ``cifar10`` loader."""
    s = Cifar10Settings.from_config(data_cfg)
    data_dir = s.tfds_dir
    builder = tfds.builder("cifar10", data_dir=data_dir)
    if not builder.is_prepared():
        if s.download:
            builder.download_and_prepare()
        else:
            raise UserInputError(
                f"cifar10 is not prepared in {data_dir}. Prepare it on a machine with internet "
                "(python -c \"import tensorflow_datasets as tfds; tfds.builder('cifar10').download_and_prepare()\") "
                "and copy its tensorflow_datasets folder here, point --config.data.data_dir at it, "
                "or set --config.data.download=True where the network is reachable."
            )
    return builder_split(builder, split, "cifar10")
