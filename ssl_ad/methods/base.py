"""What a self-supervised method gives the training loop.

The loop only calls these members, so it never branches on a method's name.
Parameters are plain pytrees; ``extra`` is whatever non-trained state the
method carries (DINO: teacher parameters and centre; MAE: nothing).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

PyTree = Any
Batch = dict[str, jax.Array]


class Method(Protocol):
    """A self-supervised objective over a ViT encoder."""

    def init(self, rng: jax.Array, batch: Batch) -> tuple[PyTree, PyTree]:
        """Returns (trainable params, extra state) for a batch of the pipeline's shape."""

    def loss(
        self, params: PyTree, extra: PyTree, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Returns (scalar loss, aux); aux['metrics'] holds scalars to log, the rest feeds update_extra."""

    def update_extra(self, extra: PyTree, params: PyTree, aux: dict[str, Any], step: jax.Array) -> PyTree:
        """Advances the extra state after the optimiser step (e.g. teacher EMA)."""

    def encoder_params(self, params: PyTree, extra: PyTree, which: str = "default") -> PyTree:
        """The ViT parameters to embed images with ('default', 'student' or 'teacher')."""

    def schedules(self) -> dict[str, Any]:
        """Step -> value schedules worth logging beside the loss (beyond lr and wd)."""
