"""What a self-supervised method gives the training loop and the evaluation.

The loop only calls :class:`Method`'s members, so it never branches on a method's name;
methods that reconstruct images (MAE) also satisfy :class:`ReconstructingMethod`, which
is what the reconstruction figures, the ``mae_recon`` scorer and pixel maps check with
``isinstance`` (both protocols are ``runtime_checkable``: only member names are checked).
Parameters are plain pytrees; ``extra`` is whatever non-trained state the
method carries (DINO: teacher parameters and centre; MAE: nothing).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

PyTree = Any
Batch = dict[str, jax.Array]


@runtime_checkable
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


@runtime_checkable
class ReconstructingMethod(Method, Protocol):
    """A method that reconstructs images from a masked view (MAE, He et al., 2022)."""

    def reconstruct(self, params: PyTree, images: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
        """One random mask per image. ``images`` (B, H, W, 3) normalised; returns 'masked',
        'reconstruction', 'original' (B, H, W, 3, normalised units), 'error' and 'mask' (B, grid, grid):
        the per-patch error on masked patches (0 elsewhere) and the mask (1 = hidden)."""

    def reconstruction_error(self, params: PyTree, images: jax.Array, rng: jax.Array, num_masks: int) -> jax.Array:
        """(B, grid, grid) per-patch reconstruction error averaged over ``num_masks`` random masks."""


def can_reconstruct(method: Any, params: PyTree) -> bool:
    """True when ``method`` reconstructs images and ``params`` hold its decoder (converted encoder-only
    MAE weights have none)."""
    return isinstance(method, ReconstructingMethod) and isinstance(params, dict) and "decoder" in params
