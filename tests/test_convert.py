"""Converting PyTorch ViT weights (timm / DINO / MAE layouts): output parity, errors, evaluation end to end.

Needs the optional 'convert' extra (torch + timm); skipped without it. PyPI's torchvision
wheels are CUDA builds: beside a CPU-only torch their C extension does not load and
torchvision's import then fails on its first fake-op registration. timm imports
torchvision (for data transforms the ViT never uses), so when that happens this file
defines the two op schemas torchvision registers unconditionally and retries: its
pure-Python part then imports, and the ViT code is timm's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the 'convert' extra (torch, timm) is not installed")


def _import_timm():
    try:
        import timm
    except ImportError as e:
        pytest.skip(f"the 'convert' extra (timm) is not importable: {e}", allow_module_level=True)
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in list(sys.modules):
            if name.split(".")[0] in ("torchvision", "timm"):
                del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _import_timm.lib = lib  # keep the registration alive
        import timm
    return timm


timm = _import_timm()
from timm.layers import PatchEmbed, resample_abs_pos_embed  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from ssl_ad import convert  # noqa: E402
from ssl_ad.errors import UserInputError  # noqa: E402
from ssl_ad.methods import build_method  # noqa: E402
from ssl_ad.methods.mae import patchify  # noqa: E402
from ssl_ad.models.vit import vit_from_config  # noqa: E402

TOL = 1e-4
SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
SMALL_SPEC = convert.ModelSpec(width=64, depth=2, num_heads=4, patch_size=8)


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


def _flax_tokens(conv, images_nchw: torch.Tensor) -> np.ndarray:
    vit = vit_from_config(convert.training_config(conv, "mae" if conv.posemb == "sincos" else "dino").model)
    x = jnp.asarray(images_nchw.permute(0, 2, 3, 1).numpy())
    return np.asarray(vit.apply({"params": conv.params["encoder"]}, x))


def _max_err(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


class NotWeights:
    """An arbitrary object: torch.load(weights_only=True) refuses to unpickle it."""


# -- encoder parity -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,arch",
    [
        ("vit_tiny_patch16_224", {}, "vit_tiny_patch16"),
        ("vit_small_patch16_224", {}, "vit_small_patch16_224"),
        ("vit_tiny_patch16_224", SMALL, SMALL_SPEC),
        # no qkv bias and no CLS position (timm's no_embed_class, DeiT-3 style)
        ("vit_tiny_patch16_224", dict(SMALL, qkv_bias=False, no_embed_class=True), SMALL_SPEC),
    ],
    ids=["vit_tiny_224", "vit_small_224", "small_32px", "no_qkv_bias_no_cls_pos"],
)
def test_all_tokens_match_timm_at_native_size(name, kwargs, arch):
    model = _timm_vit(name, **kwargs)
    spec = convert.parse_arch(arch)[0] if isinstance(arch, str) else arch
    conv = convert.convert_state_dict(_numpy_sd(model), spec)
    size = model.patch_embed.img_size[0]
    assert conv.image_size == conv.native_image_size == size and conv.posemb == "learned"
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.forward_features(x).numpy()
    err = _max_err(_flax_tokens(conv, x), ref)
    assert err < TOL, f"max abs error {err:.2e}"


@pytest.mark.parametrize("new_size", [48, 24, 40], ids=["up_4to6", "down_4to3", "up_4to5"])
def test_tokens_match_timm_after_pos_embed_interpolation(new_size):
    """Converted at another --image_size vs timm's dynamic_img_size (resample_abs_pos_embed, antialiased bicubic)."""
    model = _timm_vit(**SMALL, dynamic_img_size=True)
    conv = convert.convert_state_dict(_numpy_sd(model), SMALL_SPEC, image_size=new_size)
    assert conv.image_size == new_size and conv.native_image_size == 32
    x = torch.randn(2, 3, new_size, new_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.forward_features(x).numpy()
    err = _max_err(_flax_tokens(conv, x), ref)
    assert err < TOL, f"max abs error {err:.2e}"


def test_vit_tiny_interpolated_to_256_matches_timm_model_built_at_256():
    """timm's own way to load 224 px weights at 256 px: resample_abs_pos_embed into a 256 px model."""
    src = _timm_vit("vit_tiny_patch16_224")
    sd = src.state_dict()
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=[16, 16], num_prefix_tokens=1)
    dst = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=256).eval()
    dst.load_state_dict(sd)
    conv = convert.convert_state_dict(_numpy_sd(src), convert.parse_arch("vit_tiny_patch16")[0], image_size=256)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = dst.forward_features(x).numpy()
    err = _max_err(_flax_tokens(conv, x), ref)
    assert err < TOL, f"max abs error {err:.2e}"


def test_fc_norm_weights_convert_with_a_note():
    model = _timm_vit(**SMALL, global_pool="avg")  # timm: norm = Identity, fc_norm after pooling
    sd = _numpy_sd(model)
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    conv = convert.convert_state_dict(sd, SMALL_SPEC)
    assert any("fc_norm" in n for n in conv.notes)
    np.testing.assert_array_equal(conv.params["encoder"]["norm"]["scale"], sd["fc_norm.weight"])


# -- MAE encoder + decoder parity (the facebookresearch/mae layout) ---------------------------------


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


def _mae_state_dict(seed=0, **kwargs) -> tuple[TorchMAE, dict[str, np.ndarray]]:
    torch.manual_seed(seed)
    model = TorchMAE(**kwargs).eval()
    return model, _numpy_sd(model)


def test_mae_encoder_and_decoder_match_the_official_layout():
    model, sd = _mae_state_dict()
    conv = convert.convert_state_dict(sd, SMALL_SPEC, decoder_heads=4)
    assert conv.posemb == "sincos" and "pos_embed" not in conv.params["encoder"]
    assert conv.decoder == {"width": 32, "depth": 2, "num_heads": 4}
    config = convert.training_config(conv, convert.choose_method(conv))
    assert config.method == "mae"
    method = build_method(config)

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    ids_shuffle = torch.argsort(torch.rand(2, 16, generator=gen), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :4]
    with torch.no_grad():
        ref_tokens = model.forward_encoder(x, ids_keep)
        ref_pred = model.forward_decoder(ref_tokens, ids_restore).numpy()
        ref_patches = model.patchify(x).numpy()

    xj = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    tokens = method.encoder.apply({"params": conv.params["encoder"]}, xj, keep_idx=jnp.asarray(ids_keep.numpy()))
    pred = method.decoder.apply({"params": conv.params["decoder"]}, tokens, jnp.asarray(ids_restore.numpy()), True)
    assert _max_err(tokens, ref_tokens.numpy()) < TOL
    assert _max_err(pred, ref_pred) < TOL
    # decoder_pred's outputs are laid out as the targets are: (p, q, c) per patch.
    np.testing.assert_allclose(np.asarray(patchify(xj, 8)), ref_patches, atol=1e-6)


def test_mae_at_another_size_recomputes_sincos_for_encoder_and_decoder():
    _, sd = _mae_state_dict()
    conv = convert.convert_state_dict(sd, SMALL_SPEC, image_size=48, decoder_heads=4)
    assert conv.posemb == "sincos" and conv.image_size == 48
    method = build_method(convert.training_config(conv, "mae"))
    import jax

    x = jnp.zeros((1, 48, 48, 3))
    tokens = jax.eval_shape(lambda: method.encoder.apply({"params": conv.params["encoder"]}, x))
    assert tokens.shape == (1, 37, 64)
    pred, mask = jax.eval_shape(lambda: method.forward(conv.params, x, jax.random.key(0)))
    assert pred.shape == (1, 36, 192) and mask.shape == (1, 36)


# -- rejected inputs ----------------------------------------------------------------------------------


def test_wrong_arch_names_the_mis_shaped_keys():
    sd = _numpy_sd(_timm_vit("vit_tiny_patch16_224"))
    with pytest.raises(UserInputError) as e:
        convert.convert_state_dict(sd, convert.parse_arch("vit_small_patch16")[0])
    msg = str(e.value)
    assert "mis-shaped keys" in msg and "patch_embed.proj.weight: expected (384, 3, 16, 16), found (192, 3, 16, 16)" in msg
    assert "width 192, patch 16" in msg and "depth 12" in msg


def test_missing_unexpected_and_extra_blocks_are_named():
    sd = _numpy_sd(_timm_vit(**SMALL))
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.ls1.gamma"] = np.ones(64, np.float32)  # LayerScale: not in this ViT
    sd["head.weight"] = np.ones((10, 64), np.float32)  # a classifier: ignored
    with pytest.raises(UserInputError) as e:
        convert.convert_state_dict(sd, SMALL_SPEC)
    msg = str(e.value)
    assert "missing keys: blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys: blocks.0.ls1.gamma" in msg and "head.weight" not in msg
    with pytest.raises(UserInputError, match=r"unexpected keys: blocks\.1\.attn\.proj\.bias"):
        convert.convert_state_dict(_numpy_sd(_timm_vit(**SMALL)), dataclasses.replace(SMALL_SPEC, depth=1))
    with pytest.raises(UserInputError, match=r"missing keys: .*blocks\.2\.norm1\.weight \(64,\)"):
        convert.convert_state_dict(_numpy_sd(_timm_vit(**SMALL)), dataclasses.replace(SMALL_SPEC, depth=3))
    with pytest.raises(UserInputError, match="unknown --arch"):
        convert.parse_arch("resnet50")


def test_files_dino_training_checkpoint_safetensors_and_pickle_refusal(tmp_path):
    model = _timm_vit(**SMALL)
    sd = model.state_dict()
    # A DINO training checkpoint: teacher under 'module.backbone.', its projection head, argparse args.
    full = {
        "teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.last_layer.weight_g": torch.ones(8, 1)},
        "student": {f"module.backbone.{k}": v for k, v in sd.items()},
        "args": argparse.Namespace(arch="vit_small"),
        "epoch": 3,
    }
    torch.save(full, tmp_path / "checkpoint.pth")
    loaded = convert.load_state_dict(str(tmp_path / "checkpoint.pth"))
    assert set(loaded) == set(sd) | {"head.last_layer.weight_g"}
    conv = convert.convert_state_dict(loaded, SMALL_SPEC)
    assert conv.ignored == ["head.last_layer.weight_g"]

    from safetensors.numpy import save_file

    save_file({k: v.numpy() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    st = convert.load_state_dict(str(tmp_path / "model.safetensors"))
    assert all(np.array_equal(st[k], sd[k].numpy()) for k in sd)

    torch.save({"model": sd, "hook": NotWeights()}, tmp_path / "evil.pth")
    with pytest.raises(UserInputError, match="weights_only"):
        convert.load_state_dict(str(tmp_path / "evil.pth"))
    with pytest.raises(UserInputError, match="no weights file"):
        convert.load_state_dict(str(tmp_path / "absent.pth"))


def test_cli_writes_a_checkpoint_evaluation_loads(tmp_path, capsys):
    from ssl_ad.evaluation.embedding import load_checkpoint

    model = _timm_vit(**SMALL)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "run"
    # A custom size has no --arch name: the Python API takes a ModelSpec; the CLI is exercised below.
    conv, method = convert.convert_file(str(tmp_path / "w.pth"), SMALL_SPEC, str(out))
    assert method == "dino"
    loaded = load_checkpoint(str(out))
    assert loaded.config.method == "dino" and loaded.step == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_features(x).numpy()
    for which in ("teacher", "student"):
        tokens = loaded.encoder().apply({"params": loaded.encoder_params(which)}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
        assert _max_err(tokens, ref) < TOL

    tiny = _timm_vit("vit_tiny_patch16_224")
    torch.save({"model": tiny.state_dict()}, tmp_path / "tiny.pth")
    convert.main([f"--from={tmp_path / 'tiny.pth'}", "--arch=vit_tiny_patch16", f"--out={tmp_path / 'tiny'}",
                  "--image_size=160", "--method=mae"])
    assert "mae, encoder only, 160 px" in capsys.readouterr().out
    loaded = load_checkpoint(str(tmp_path / "tiny"))
    assert loaded.config.model.image_size == 160 and loaded.config.method == "mae"
    assert loaded.encoder_params("default")["pos_embed"].shape == (1, 100, 192)
    with pytest.raises(SystemExit) as e:  # a second conversion into the same --out is refused
        convert.main([f"--from={tmp_path / 'tiny.pth'}", "--arch=vit_tiny_patch16", f"--out={tmp_path / 'tiny'}"])
    assert e.value.code == 2 and "already holds a checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        convert.main([f"--from={tmp_path / 'tiny.pth'}", "--arch=vit_base_patch16", f"--out={tmp_path / 'b'}"])
    assert e.value.code == 2 and "mis-shaped keys" in capsys.readouterr().err


def test_core_never_imports_torch():
    import subprocess

    from tests.conftest import REPO

    code = ("import sys, ssl_ad.convert, ssl_ad.evaluation.runner, ssl_ad.train.loop, ssl_ad.methods; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- end to end through the evaluation runner ---------------------------------------------------------


@pytest.fixture
def small_mnist5k(data_dir):
    """mnist5k, capped per class by each test's ``data.max_per_class``."""
    return data_dir


def _eval_config(data_dir, checkpoint, scorers="knn", per_class=6):
    from configs import eval_mnist5k

    c = eval_mnist5k.get_config()
    c.data.data_dir = data_dir
    c.data.max_per_class = per_class
    c.checkpoint = checkpoint
    c.sources = ""
    c.scorers = scorers
    c.protocols = "one_class"
    c.tsne_points = 0
    c.pca_dims = 0
    c.max_train_per_round = per_class
    c.batch_size = 10 * per_class  # one batch per split, no padding
    c.mae_recon.num_masks = 2
    return c


def test_converted_timm_vit_tiny_224_runs_through_evaluation(tmp_path, small_mnist5k):
    from ssl_ad.evaluation.runner import run_evaluation

    torch.save(_timm_vit("vit_tiny_patch16_224").state_dict(), tmp_path / "vit_tiny.pth")
    convert.main([f"--from={tmp_path / 'vit_tiny.pth'}", "--arch=vit_tiny_patch16", f"--out={tmp_path / 'vit_tiny'}"])
    rows = run_evaluation(_eval_config(small_mnist5k, str(tmp_path / "vit_tiny")), str(tmp_path / "report"))
    assert [(r["feature"], r["scorer"], r["protocol"]) for r in rows] == [("vit_tiny", "knn", "one_class")]
    assert 0.0 <= rows[0]["mean_auroc"] <= 1.0 and len(rows[0]["per_round"]) == 10
    assert rows[0]["feature_dims"] == 192


def test_converted_mae_with_decoder_runs_mae_recon(tmp_path, small_mnist5k):
    from ssl_ad.evaluation.runner import run_evaluation

    model, _ = _mae_state_dict()
    torch.save({"model": model.state_dict()}, tmp_path / "mae_visualize.pth")
    convert.convert_file(str(tmp_path / "mae_visualize.pth"), SMALL_SPEC, str(tmp_path / "mae"), decoder_heads=4,
                         norm_pix_loss=False)
    rows = run_evaluation(_eval_config(small_mnist5k, str(tmp_path / "mae"), "knn,mae_recon", per_class=4),
                          str(tmp_path / "report"))
    assert {(r["feature"], r["scorer"]) for r in rows} == {("mae", "knn"), ("mae", "mae_recon")}
    assert all(0.0 <= r["mean_auroc"] <= 1.0 for r in rows)


def test_encoder_only_mae_checkpoint_runs_through_evaluation(tmp_path, small_mnist5k):
    from ssl_ad.evaluation.runner import run_evaluation

    model, sd = _mae_state_dict()
    enc = {k: v for k, v in model.state_dict().items() if not (k.startswith("decoder_") or k == "mask_token")}
    torch.save({"model": enc}, tmp_path / "mae_pretrain.pth")
    _, method = convert.convert_file(str(tmp_path / "mae_pretrain.pth"), SMALL_SPEC, str(tmp_path / "mae_enc"))
    assert method == "mae"
    rows = run_evaluation(_eval_config(small_mnist5k, str(tmp_path / "mae_enc"), "knn,mae_recon", per_class=4),
                          str(tmp_path / "report"))
    assert [(r["feature"], r["scorer"]) for r in rows] == [("mae_enc", "knn")]
