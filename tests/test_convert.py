"""Converting PyTorch ViT weights (timm / DINO / MAE layouts): output parity, errors, evaluation end to end.

Needs the optional 'convert' extra (torch, torchvision, timm); skipped without it.

The PyTorch side runs in a subprocess: the ``reference`` fixture runs tests/torch_reference.py
once per session, which builds the timm models and the official-layout MAE with seeded,
perturbed weights, runs their forward passes and writes weights files (.pth, .safetensors,
state dicts as .npz) and reference inputs/outputs (.npz) to a temporary folder; the tests here
convert those weights and compare the Flax outputs with the stored ones. Why: PyPI's torch is a
CUDA build that depends on triton, and importing timm imports torchvision, which imports triton;
in a process that has already imported TensorFlow (this one: tf.data, via ssl_ad's data code and
other test modules) loading triton's native library segfaults, killing the whole test run.
``import torch`` alone after TensorFlow is fine, so this process still reads .pth files through
``ssl_ad.convert`` (torch.load); it never imports timm, torchvision or triton
(``test_this_process_never_imports_timm_torchvision_or_triton``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from ssl_ad import convert
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation.embedding import load_checkpoint as load_run
from ssl_ad.methods import build_method
from ssl_ad.methods.mae import patchify
from ssl_ad.models.vit import vit_from_config

pytest.importorskip("torch", reason="the 'convert' extra (torch, timm) is not installed")
if importlib.util.find_spec("timm") is None:  # found without importing it (see the module docstring)
    pytest.skip("the 'convert' extra (timm) is not installed", allow_module_level=True)

TOL = 1e-4
SMALL_SPEC = convert.ModelSpec(width=64, depth=2, num_heads=4, patch_size=8)
REFERENCE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
NO_TIMM_EXIT = 3  # torch_reference.NO_TIMM_EXIT: timm is not importable there


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The folder tests/torch_reference.py wrote every case's weights and reference outputs to.

    Run once per session in a subprocess that imports torch and timm but not TensorFlow (see the
    module docstring). timm is installed (the module would have been skipped otherwise), so a timm
    that does not import there (e.g. a torchvision built for another torch) is a broken install of
    the extra and fails the tests, with the reason.
    """
    out = tmp_path_factory.mktemp("torch_reference")
    proc = subprocess.run([sys.executable, REFERENCE_SCRIPT, f"--out={out}"], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode == NO_TIMM_EXIT:
        pytest.fail("the 'convert' extra is installed but does not import: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"{REFERENCE_SCRIPT} exited with status {proc.returncode}:\n{proc.stderr[-3000:]}"
    return out


def _sd(reference: Path, case: str) -> dict[str, np.ndarray]:
    """A case's state dict (float32 arrays by key), a fresh copy each call (tests edit it)."""
    with np.load(reference / f"{case}.npz") as f:
        return {k: f[k] for k in f.files}


def _io(reference: Path, case: str) -> dict[str, np.ndarray]:
    """A case's reference inputs (``x``: NCHW images, ...) and PyTorch outputs (``ref``, ...)."""
    with np.load(reference / f"{case}.io.npz") as f:
        return {k: f[k] for k in f.files}


def _nhwc(images_nchw: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.transpose(images_nchw, (0, 2, 3, 1)))


def _flax_tokens(conv, images_nchw: np.ndarray) -> np.ndarray:
    vit = vit_from_config(convert.training_config(conv, "mae" if conv.posemb == "sincos" else "dino").model)
    return np.asarray(vit.apply({"params": conv.params["encoder"]}, _nhwc(images_nchw)))


def _max_err(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# -- encoder parity -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case,arch",
    [
        ("vit_tiny_224", "vit_tiny_patch16"),
        ("vit_small_224", "vit_small_patch16_224"),
        ("small_32px", SMALL_SPEC),
        # no qkv bias and no CLS position (timm's no_embed_class, DeiT-3 style)
        ("no_qkv_bias_no_cls_pos", SMALL_SPEC),
    ],
    ids=["vit_tiny_224", "vit_small_224", "small_32px", "no_qkv_bias_no_cls_pos"],
)
def test_all_tokens_match_timm_at_native_size(reference, case, arch):
    spec = convert.parse_arch(arch)[0] if isinstance(arch, str) else arch
    conv = convert.convert_state_dict(_sd(reference, case), spec)
    io = _io(reference, case)
    size = int(io["img_size"])
    assert conv.image_size == conv.native_image_size == size and conv.posemb == "learned"
    err = _max_err(_flax_tokens(conv, io["x"]), io["ref"])
    assert err < TOL, f"max abs error {err:.2e}"


@pytest.mark.parametrize("case,new_size", [("up_4to6", 48), ("down_4to3", 24), ("up_4to5", 40)],
                         ids=["up_4to6", "down_4to3", "up_4to5"])
def test_tokens_match_timm_after_pos_embed_interpolation(reference, case, new_size):
    """Converted at another --image_size vs timm's dynamic_img_size (resample_abs_pos_embed, antialiased bicubic)."""
    conv = convert.convert_state_dict(_sd(reference, "dynamic_32px"), SMALL_SPEC, image_size=new_size)
    assert conv.image_size == new_size and conv.native_image_size == 32
    io = _io(reference, case)
    assert io["x"].shape == (2, 3, new_size, new_size)
    err = _max_err(_flax_tokens(conv, io["x"]), io["ref"])
    assert err < TOL, f"max abs error {err:.2e}"


def test_vit_tiny_interpolated_to_256_matches_timm_model_built_at_256(reference):
    """timm's own way to load 224 px weights at 256 px: resample_abs_pos_embed into a 256 px model."""
    conv = convert.convert_state_dict(_sd(reference, "vit_tiny_224"), convert.parse_arch("vit_tiny_patch16")[0],
                                      image_size=256)
    io = _io(reference, "vit_tiny_at_256")
    err = _max_err(_flax_tokens(conv, io["x"]), io["ref"])
    assert err < TOL, f"max abs error {err:.2e}"


def test_fc_norm_weights_convert_with_a_note(reference):
    sd = _sd(reference, "fc_norm")  # timm's global_pool='avg': norm = Identity, fc_norm after pooling
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    conv = convert.convert_state_dict(sd, SMALL_SPEC)
    assert any("fc_norm" in n for n in conv.notes)
    np.testing.assert_array_equal(conv.params["encoder"]["norm"]["scale"], sd["fc_norm.weight"])


# -- MAE encoder + decoder parity (the facebookresearch/mae layout) ---------------------------------


def test_mae_encoder_and_decoder_match_the_official_layout(reference):
    conv = convert.convert_state_dict(_sd(reference, "mae"), SMALL_SPEC, decoder_heads=4)
    assert conv.posemb == "sincos" and "pos_embed" not in conv.params["encoder"]
    assert conv.decoder == {"width": 32, "depth": 2, "num_heads": 4}
    config = convert.training_config(conv, convert.choose_method(conv))
    assert config.method == "mae"
    method = build_method(config)

    io = _io(reference, "mae")  # 2 images, 16 patches, 4 kept
    xj = _nhwc(io["x"])
    tokens = method.encoder.apply({"params": conv.params["encoder"]}, xj, keep_idx=jnp.asarray(io["ids_keep"]))
    pred = method.decoder.apply({"params": conv.params["decoder"]}, tokens, jnp.asarray(io["ids_restore"]), True)
    assert _max_err(tokens, io["ref_tokens"]) < TOL
    assert _max_err(pred, io["ref_pred"]) < TOL
    # decoder_pred's outputs are laid out as the targets are: (p, q, c) per patch.
    np.testing.assert_allclose(np.asarray(patchify(xj, 8)), io["ref_patches"], atol=1e-6)


def test_mae_at_another_size_recomputes_sincos_for_encoder_and_decoder(reference):
    conv = convert.convert_state_dict(_sd(reference, "mae"), SMALL_SPEC, image_size=48, decoder_heads=4)
    assert conv.posemb == "sincos" and conv.image_size == 48
    method = build_method(convert.training_config(conv, "mae"))
    import jax

    x = jnp.zeros((1, 48, 48, 3))
    tokens = jax.eval_shape(lambda: method.encoder.apply({"params": conv.params["encoder"]}, x))
    assert tokens.shape == (1, 37, 64)
    pred, mask = jax.eval_shape(lambda: method.forward(conv.params, x, jax.random.key(0)))
    assert pred.shape == (1, 36, 192) and mask.shape == (1, 36)


# -- rejected inputs ----------------------------------------------------------------------------------


def test_wrong_arch_names_the_mis_shaped_keys(reference):
    sd = _sd(reference, "vit_tiny_224")
    with pytest.raises(UserInputError) as e:
        convert.convert_state_dict(sd, convert.parse_arch("vit_small_patch16")[0])
    msg = str(e.value)
    assert "mis-shaped keys" in msg and "patch_embed.proj.weight: expected (384, 3, 16, 16), found (192, 3, 16, 16)" in msg
    assert "width 192, patch 16" in msg and "depth 12" in msg


def test_missing_unexpected_and_extra_blocks_are_named(reference):
    sd = _sd(reference, "small")
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.ls1.gamma"] = np.ones(64, np.float32)  # LayerScale: not in this ViT
    sd["head.weight"] = np.ones((10, 64), np.float32)  # a classifier: ignored
    with pytest.raises(UserInputError) as e:
        convert.convert_state_dict(sd, SMALL_SPEC)
    msg = str(e.value)
    assert "missing keys: blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys: blocks.0.ls1.gamma" in msg and "head.weight" not in msg
    with pytest.raises(UserInputError, match=r"unexpected keys: blocks\.1\.attn\.proj\.bias"):
        convert.convert_state_dict(_sd(reference, "small"), dataclasses.replace(SMALL_SPEC, depth=1))
    with pytest.raises(UserInputError, match=r"missing keys: .*blocks\.2\.norm1\.weight \(64,\)"):
        convert.convert_state_dict(_sd(reference, "small"), dataclasses.replace(SMALL_SPEC, depth=3))
    with pytest.raises(UserInputError, match="unknown --arch"):
        convert.parse_arch("resnet50")


def test_files_dino_training_checkpoint_safetensors_and_pickle_refusal(reference, tmp_path):
    sd = _sd(reference, "small")
    # A DINO training checkpoint: teacher under 'module.backbone.', its projection head, argparse args.
    loaded = convert.load_state_dict(str(reference / "dino_checkpoint.pth"))
    assert set(loaded) == set(sd) | {"head.last_layer.weight_g"}
    conv = convert.convert_state_dict(loaded, SMALL_SPEC)
    assert conv.ignored == ["head.last_layer.weight_g"]

    st = convert.load_state_dict(str(reference / "small.safetensors"))
    assert all(np.array_equal(st[k], sd[k]) for k in sd)

    # {'model': the state dict, 'hook': an arbitrary pickled object}
    with pytest.raises(UserInputError, match="weights_only"):
        convert.load_state_dict(str(reference / "evil.pth"))
    with pytest.raises(UserInputError, match="no weights file"):
        convert.load_state_dict(str(tmp_path / "absent.pth"))


def test_cli_writes_a_checkpoint_evaluation_loads(reference, tmp_path, capsys):
    from ssl_ad.evaluation.embedding import load_checkpoint

    out = tmp_path / "run"
    # A custom size has no --arch name: the Python API takes a ModelSpec; the CLI is exercised below.
    conv, method = convert.convert_file(str(reference / "small.pth"), SMALL_SPEC, str(out))
    assert method == "dino"
    loaded = load_checkpoint(str(out))
    assert loaded.config.method == "dino" and loaded.step == 0
    io = _io(reference, "small")
    for which in ("teacher", "student"):
        tokens = loaded.encoder().apply({"params": loaded.encoder_params(which)}, _nhwc(io["x"]))
        assert _max_err(tokens, io["ref"]) < TOL

    tiny = reference / "vit_tiny_model.pth"  # {'model': ViT-Ti/16's state dict}
    convert.main([f"--from={tiny}", "--arch=vit_tiny_patch16", f"--out={tmp_path / 'tiny'}",
                  "--image_size=160", "--method=mae"])
    assert "mae, encoder only, 160 px" in capsys.readouterr().out
    loaded = load_checkpoint(str(tmp_path / "tiny"))
    assert loaded.config.model.image_size == 160 and loaded.config.method == "mae"
    assert loaded.encoder_params("default")["pos_embed"].shape == (1, 100, 192)
    with pytest.raises(SystemExit) as e:  # a second conversion into the same --out is refused
        convert.main([f"--from={tiny}", "--arch=vit_tiny_patch16", f"--out={tmp_path / 'tiny'}"])
    assert e.value.code == 2 and "already holds a checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        convert.main([f"--from={tiny}", "--arch=vit_base_patch16", f"--out={tmp_path / 'b'}"])
    assert e.value.code == 2 and "mis-shaped keys" in capsys.readouterr().err


def test_core_never_imports_torch():
    from tests.conftest import REPO

    code = ("import sys, ssl_ad.convert, ssl_ad.evaluation.runner, ssl_ad.train.loop, ssl_ad.methods; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_this_process_never_imports_timm_torchvision_or_triton(reference):
    """The design this module rests on (see its docstring): torch.load here, timm only in the subprocess."""
    convert.load_state_dict(str(reference / "small.pth"))  # torch alone: fine after TensorFlow
    assert "torch" in sys.modules
    bad = sorted({m.split(".")[0] for m in sys.modules} & {"timm", "torchvision", "triton"})
    assert not bad, f"imported in the test process: {bad}"


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


def test_converted_timm_vit_tiny_224_runs_through_evaluation(reference, tmp_path, small_mnist5k):
    from ssl_ad.evaluation.runner import run_evaluation

    convert.main([f"--from={reference / 'vit_tiny.pth'}", "--arch=vit_tiny_patch16", f"--out={tmp_path / 'vit_tiny'}"])
    rows = run_evaluation(_eval_config(small_mnist5k, str(tmp_path / "vit_tiny")), str(tmp_path / "report"))
    assert [(r["feature"], r["scorer"], r["protocol"]) for r in rows] == [("vit_tiny", "knn", "one_class")]
    assert 0.0 <= rows[0]["mean_auroc"] <= 1.0 and len(rows[0]["per_round"]) == 10
    assert rows[0]["feature_dims"] == 192


def test_converted_mae_with_decoder_runs_mae_recon(reference, tmp_path, small_mnist5k):
    from ssl_ad.evaluation.runner import run_evaluation

    convert.convert_file(str(reference / "mae_visualize.pth"), SMALL_SPEC, str(tmp_path / "mae"), decoder_heads=4,
                         norm_pix_loss=False)
    rows = run_evaluation(_eval_config(small_mnist5k, str(tmp_path / "mae"), "knn,mae_recon", per_class=4),
                          str(tmp_path / "report"))
    assert {(r["feature"], r["scorer"]) for r in rows} == {("mae", "knn"), ("mae", "mae_recon")}
    assert all(0.0 <= r["mean_auroc"] <= 1.0 for r in rows)


def test_encoder_only_mae_checkpoint_runs_through_evaluation(reference, tmp_path, small_mnist5k):
    from ssl_ad.evaluation.runner import run_evaluation

    # {'model': the MAE state dict without decoder_* and mask_token}
    _, method = convert.convert_file(str(reference / "mae_pretrain.pth"), SMALL_SPEC, str(tmp_path / "mae_enc"))
    assert method == "mae"
    rows = run_evaluation(_eval_config(small_mnist5k, str(tmp_path / "mae_enc"), "knn,mae_recon", per_class=4),
                          str(tmp_path / "report"))
    assert [(r["feature"], r["scorer"]) for r in rows] == [("mae_enc", "knn")]


def test_scan_blocks_writes_the_scanned_layout_evaluation_loads(reference, tmp_path):
    """``--scan_blocks=true``: model.scan_blocks=True and the blocks stacked under 'blocks' (layer
    axis first); the loaded encoder reproduces timm's tokens."""
    convert.convert_file(str(reference / "small.pth"), SMALL_SPEC, str(tmp_path / "run"), scan_blocks=True)
    loaded = load_run(str(tmp_path / "run"))
    params = loaded.encoder_params("teacher")
    assert loaded.config.model.scan_blocks is True and "block0" not in params
    assert params["blocks"]["attn"]["qkv"]["kernel"].shape == (SMALL_SPEC.depth, 64, 192)
    io = _io(reference, "small")
    tokens = loaded.encoder().apply({"params": params}, _nhwc(io["x"]))
    assert _max_err(tokens, io["ref"]) < TOL
