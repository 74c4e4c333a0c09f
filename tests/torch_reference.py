"""The PyTorch side of tests/test_convert.py: writes every case's weights and timm's outputs to a folder.

    python tests/torch_reference.py --out DIR

Run once per test session, in a subprocess, by test_convert.py's ``reference`` fixture; it
imports torch, timm, numpy and safetensors only (never ssl_ad, JAX or TensorFlow; checked on
exit). Why a separate process: PyPI's torch (a CUDA build) depends on triton, and torchvision's
import (hence timm's) imports triton; in a process that has already imported TensorFlow, as
pytest has by the time test_convert.py runs (tf.data), loading triton's native library
segfaults (an LLVM symbol clash). Importing torch alone after TensorFlow is fine, so the test
process still reads ``.pth`` files through ``ssl_ad.convert`` (torch.load); only the model
construction and forward passes live here.

Writes, into ``DIR``:

* ``<case>.npz``: a state dict as float32 arrays, one entry per key (what ``convert_state_dict``
  takes), and ``<case>.io.npz`` beside it where the case has reference inputs and outputs;
* ``.pth`` / ``.safetensors`` files for the tests that go through ``convert.load_state_dict``,
  ``convert_file`` and the CLI, including a DINO training checkpoint and a file that
  ``torch.load(weights_only=True)`` must refuse.

Exit status 3 with one line on stderr when timm is not importable (the test module then skips).
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import numpy as np

NO_TIMM_EXIT = 3  # test_convert.py fails on this status, with the stderr line as the reason

try:
    import torch
    import timm
    from safetensors.numpy import save_file
    from timm.layers import PatchEmbed, resample_abs_pos_embed
    from timm.models.vision_transformer import Block
except ImportError as e:
    sys.stderr.write(f"the 'convert' extra is not importable: {type(e).__name__}: {e}\n")
    sys.exit(NO_TIMM_EXIT)
except RuntimeError as e:  # a torchvision build that does not match torch fails on its first op registration
    if "torchvision::" not in str(e):
        raise
    sys.stderr.write(f"timm does not import: torchvision does not match this torch ({type(e).__name__}: {e}); "
                     "install the 'convert' extra's pins\n")
    sys.exit(NO_TIMM_EXIT)

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
NATIVE = {  # test id: timm model name and create_model kwargs
    "vit_tiny_224": ("vit_tiny_patch16_224", {}),
    "vit_small_224": ("vit_small_patch16_224", {}),
    "small_32px": ("vit_tiny_patch16_224", SMALL),
    # no qkv bias and no CLS position (timm's no_embed_class, DeiT-3 style)
    "no_qkv_bias_no_cls_pos": ("vit_tiny_patch16_224", dict(SMALL, qkv_bias=False, no_embed_class=True)),
}
INTERPOLATED = {"up_4to6": 48, "down_4to3": 24, "up_4to5": 40}  # test id: new image size of the 32 px model


def _timm_vit(name="vit_tiny_patch16_224", seed=0, **kwargs):
    """A timm ViT with random weights, every parameter (LayerNorms included) perturbed."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _numpy_sd(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _features(model, x) -> np.ndarray:
    with torch.no_grad():
        return model.forward_features(x).numpy()


class NotWeights:
    """An arbitrary object: torch.load(weights_only=True) refuses to unpickle it."""


# -- the official MAE layout ------------------------------------------------------------------------


def _mae_1d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_sincos(dim, grid_size, cls_token=False):
    """facebookresearch/mae util/pos_embed.py::get_2d_sincos_pos_embed, verbatim in substance."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([_mae_1d(dim // 2, grid[0]), _mae_1d(dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb


class TorchMAE(torch.nn.Module):
    """models_mae.MaskedAutoencoderViT's parameters and forward passes (official names)."""

    def __init__(self, img=32, patch=8, dim=64, depth=2, heads=4, ddim=32, ddepth=2, dheads=4):
        super().__init__()
        nn = torch.nn
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch = patch
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, ddim) * 0.02)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, ddim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(ddim, dheads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(ddepth)]
        )
        self.decoder_norm = norm(ddim)
        self.decoder_pred = nn.Linear(ddim, patch * patch * 3)
        g = int(n**0.5)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.05 * torch.randn_like(p))
            self.pos_embed.copy_(torch.from_numpy(mae_sincos(dim, g, True)).float()[None])
            self.decoder_pos_embed.copy_(torch.from_numpy(mae_sincos(ddim, g, True)).float()[None])

    def patchify(self, imgs):
        p = self.patch
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p * p * 3)

    def forward_encoder(self, x, ids_keep):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]


def _mae_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TorchMAE(**kwargs).eval()


# -- the cases ----------------------------------------------------------------------------------------


def write_all(out: str) -> None:
    """Every file test_convert.py reads (names in the module docstring and the tests)."""

    def path(name):
        return os.path.join(out, name)

    def save_sd(name, sd):
        np.savez(path(f"{name}.npz"), **sd)

    def save_io(name, **arrays):
        np.savez(path(f"{name}.io.npz"), **arrays)

    # Encoder parity at the native size: the state dict, the input, timm's tokens.
    native = {}
    for case, (name, kwargs) in NATIVE.items():
        native[case] = model = _timm_vit(name, **kwargs)
        size = model.patch_embed.img_size[0]
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        save_sd(case, _numpy_sd(model))
        save_io(case, x=x.numpy(), ref=_features(model, x), img_size=np.int64(size))

    # Another size vs timm's dynamic_img_size (resample_abs_pos_embed, antialiased bicubic).
    model = _timm_vit(**SMALL, dynamic_img_size=True)
    save_sd("dynamic_32px", _numpy_sd(model))
    for case, new_size in INTERPOLATED.items():
        x = torch.randn(2, 3, new_size, new_size, generator=torch.Generator().manual_seed(2))
        save_io(case, x=x.numpy(), ref=_features(model, x))

    # timm's own way to load 224 px weights at 256 px (vit_tiny_224's): resample_abs_pos_embed into a 256 px model.
    sd = dict(native["vit_tiny_224"].state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=[16, 16], num_prefix_tokens=1)
    dst = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=256).eval()
    dst.load_state_dict(sd)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    save_io("vit_tiny_at_256", x=x.numpy(), ref=_features(dst, x))

    # timm's global_pool='avg': norm = Identity, fc_norm after pooling.
    save_sd("fc_norm", _numpy_sd(_timm_vit(**SMALL, global_pool="avg")))

    # MAE (official layout): encoder on the kept patches, decoder, patchify.
    mae = _mae_model()
    save_sd("mae", _numpy_sd(mae))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    ids_shuffle = torch.argsort(torch.rand(2, 16, generator=gen), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :4]
    with torch.no_grad():
        ref_tokens = mae.forward_encoder(x, ids_keep)
        ref_pred = mae.forward_decoder(ref_tokens, ids_restore)
        ref_patches = mae.patchify(x)
    save_io("mae", x=x.numpy(), ids_keep=ids_keep.numpy(), ids_restore=ids_restore.numpy(),
            ref_tokens=ref_tokens.numpy(), ref_pred=ref_pred.numpy(), ref_patches=ref_patches.numpy())
    torch.save({"model": mae.state_dict()}, path("mae_visualize.pth"))  # with the decoder
    enc = {k: v for k, v in mae.state_dict().items() if not (k.startswith("decoder_") or k == "mask_token")}
    torch.save({"model": enc}, path("mae_pretrain.pth"))  # encoder only

    # The 32 px ViT (seed 0) as files: a plain state dict and timm's tokens for an unseeded input
    # drawn right after construction, as the CLI and scan_blocks tests take it.
    small = _timm_vit(**SMALL)
    x = torch.randn(2, 3, 32, 32)
    sd = small.state_dict()
    torch.save(sd, path("small.pth"))
    save_sd("small", _numpy_sd(small))
    save_io("small", x=x.numpy(), ref=_features(small, x))
    # A DINO training checkpoint: teacher under 'module.backbone.', its projection head, argparse args.
    full = {
        "teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.last_layer.weight_g": torch.ones(8, 1)},
        "student": {f"module.backbone.{k}": v for k, v in sd.items()},
        "args": argparse.Namespace(arch="vit_small"),
        "epoch": 3,
    }
    torch.save(full, path("dino_checkpoint.pth"))
    save_file({k: v.numpy() for k, v in sd.items()}, path("small.safetensors"))
    torch.save({"model": sd, "hook": NotWeights()}, path("evil.pth"))

    # ViT-Ti/16 at 224 px (vit_tiny_224's) as files: a plain state dict and one under 'model' (MAE/DeiT files).
    tiny = native["vit_tiny_224"].state_dict()
    torch.save(tiny, path("vit_tiny.pth"))
    torch.save({"model": tiny}, path("vit_tiny_model.pth"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder the files are written to (created)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    write_all(args.out)
    leaked = sorted({m.split(".")[0] for m in sys.modules} & {"ssl_ad", "jax", "tensorflow"})
    assert not leaked, f"the reference process must not import {leaked} (see the module docstring)"

if __name__ == "__main__":
    main()
