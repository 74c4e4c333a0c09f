"""``model.variant`` (big_vision-style ViT sizes, ssl_ad.models.variants).

decode_variant's table and patch parsing, the errors for unknown names and for size keys that
contradict the variant, the shipped training configs resolving to exactly the sizes they spelled
out before the key existed, the weight converter reading the same table, and resuming a run whose
saved config predates the key.
"""

import glob
import importlib
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from ssl_ad import config_defaults, convert
from ssl_ad.ablation.grid import ablation_config, dotted, make_plan
from ssl_ad.config_check import RULES, TRAIN_LINKS, validate_eval_config, validate_train_config, violations
from ssl_ad.errors import UserInputError
from ssl_ad.models import variants
from ssl_ad.models.vit import PRESETS, ViT, apply_variant, decode_variant, vit_from_config
from ssl_ad.train import config_history
from tests.conftest import REPO

SIZE_FIELDS = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio")

# big_vision/models/vit.py decode_variant (width, depth, heads, mlp_dim); 'mu' is ssl_ad's own.
BIG_VISION = {
    "mu": (96, 4, 3, 384),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}

# (image_size, patch_size, width, depth, num_heads, mlp_ratio) of every shipped training config,
# recorded from the configs as they were before model.variant existed (explicit keys).
TODAY = {
    "dino_cifar10": (32, 4, 192, 12, 3, 4.0),
    "dino_mnist5k": (28, 7, 96, 4, 3, 4.0),
    "dino_vits16_224": (224, 16, 384, 12, 6, 4.0),
    "mae_cifar10": (32, 4, 192, 12, 3, 4.0),
    "mae_image_folder": (224, 16, 384, 12, 6, 4.0),
    "mae_mnist5k": (28, 4, 96, 4, 3, 4.0),
    "mae_mvtec": (224, 16, 384, 12, 6, 4.0),
    "mae_vitb16_224": (224, 16, 768, 12, 12, 4.0),
}
TRAIN_CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if not os.path.basename(p).startswith(("eval", "predict"))  # evaluation / prediction configs
)


def load(name):
    return importlib.import_module(f"configs.{name}").get_config()


def base(**model):
    c = config_defaults.base_config()
    for k, v in model.items():
        c.model[k] = v
    return c


# -- decode_variant -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BIG_VISION))
def test_decode_variant_gives_each_preset(name):
    width, depth, heads, mlp_dim = BIG_VISION[name]
    sizes = decode_variant(name)
    assert sizes == {"width": width, "depth": depth, "num_heads": heads, "mlp_ratio": 4.0}
    assert int(sizes["width"] * sizes["mlp_ratio"]) == mlp_dim
    assert PRESETS[name] == (width, depth, heads)
    assert decode_variant(f"{name}/16") == {**sizes, "patch_size": 16}


def test_one_table():
    assert set(PRESETS) == set(BIG_VISION)
    assert PRESETS is variants.PRESETS  # ssl_ad.models.vit re-exports the table, no copy


@pytest.mark.parametrize("variant, patch", [("S/16", 16), ("B/14", 14), ("Ti/4", 4), ("mu/7", 7), ("H/1", 1),
                                            ("L/100", 100), ("S", None)])
def test_the_part_after_the_slash_is_the_patch(variant, patch):
    assert decode_variant(variant).get("patch_size") == patch


def test_no_variant():
    assert decode_variant("") == {}
    c = base(width=100, num_heads=4, patch_size=5)
    apply_variant(c.model)
    assert (c.model.width, c.model.num_heads, c.model.patch_size) == (100, 4, 5)


@pytest.mark.parametrize("bad", ["X/16", "S/abc", "S/0", "S/016", "s/16", "S/16/2", "S/", "/16", " S/16", "vit_small",
                                 "S/-4", "S/1.5"])
def test_unknown_variant_is_an_error(bad):
    with pytest.raises(UserInputError) as e:
        decode_variant(bad)
    assert f"unknown model.variant {bad!r}" in str(e.value)
    assert "'mu', 'Ti', 'S', 'B', 'L', 'H'" in str(e.value) and "'S/16'" in str(e.value)
    assert not RULES["model.variant"].ok(bad)
    with pytest.raises(UserInputError, match="^invalid training config: model.variant=") as e:
        validate_train_config(base(variant=bad))
    assert str(e.value).count("model.variant=") == 1  # one rule message, no conflict message after it


def test_the_rule_accepts_every_name():
    rule = RULES["model.variant"]
    for name in PRESETS:
        assert rule.ok(name) and rule.ok(f"{name}/16")
    assert rule.ok("") and not rule.ok(None) and not rule.ok(16)


# -- applying a variant to a model block ----------------------------------------------------------


def test_a_variant_sets_the_sizes_in_place_and_keeps_the_patch_when_not_named():
    c = base(variant="S/16")
    c.lock()  # as train.py's config flag
    validate_train_config(c)
    assert tuple(c.model[k] for k in SIZE_FIELDS) == (32, 16, 384, 12, 6, 4.0)
    assert c.model.variant == "S/16"  # the name stays, beside the sizes it stands for

    c = base(variant="B", patch_size=8)
    validate_train_config(c)
    assert tuple(c.model[k] for k in SIZE_FIELDS) == (32, 8, 768, 12, 12, 4.0)


def test_keys_at_the_variants_value_or_at_the_default_are_no_conflict():
    c = base(variant="S/16", width=384, num_heads=6, depth=12)  # depth 12: also the default
    apply_variant(c.model)
    first = c.model.to_dict()
    apply_variant(c.model)  # a resolved block (as config.json saves it) resolves to itself
    assert c.model.to_dict() == first
    # The documented price of "set = differs from the default": width 192 (the default) is unset.
    c = base(variant="S/16", width=192)
    apply_variant(c.model)
    assert c.model.width == 384


def test_a_conflicting_key_names_both_values():
    c = base(variant="S/16", width=512)
    with pytest.raises(UserInputError) as e:
        validate_train_config(c)
    msg = str(e.value)
    assert msg == ("invalid training config: model.variant='S/16' means model.width=384, but the config also sets "
                   "model.width=512; drop that key, or set model.variant='' to give the sizes explicitly")
    assert c.model.width == 512 and c.model.depth == 12  # an invalid config is not changed

    c = base(variant="mu/4", width=32, depth=2, num_heads=2, patch_size=7)
    with pytest.raises(UserInputError) as e:
        apply_variant(c.model)
    assert str(e.value).startswith(
        "model.variant='mu/4' means model.width=96, model.depth=4, model.num_heads=3, model.patch_size=4, but the "
        "config also sets model.width=32, model.depth=2, model.num_heads=2, model.patch_size=7; drop those keys")
    with pytest.raises(UserInputError, match="model.variant='mu/4' means"):
        vit_from_config(c.model)  # the builder applies the same rule
    with pytest.raises(UserInputError, match="model.variant='mu/4' means"):
        validate_eval_config(base(variant="mu/4", width=32))


def test_links_see_the_variants_patch():
    c = base(variant="S/16", image_size=40)  # 40 is a multiple of the default patch 4, not of 16
    assert violations(c) == []
    assert violations(c, TRAIN_LINKS) == ["model.image_size=40, model.patch_size=16 (model.image_size must be a multiple of "
                   "model.patch_size)"]


def test_vit_from_config_resolves_on_a_copy():
    model = base(variant="mu/7", image_size=28).model
    vit = vit_from_config(model, method="mae")
    explicit = vit_from_config(base(image_size=28, patch_size=7, width=96, depth=4, num_heads=3).model, method="mae")
    assert (vit.patch_size, vit.width, vit.depth, vit.num_heads, vit.mlp_ratio) == (7, 96, 4, 3, 4.0)
    assert model.width == 192  # the caller's block is not changed
    x = jax.numpy.zeros((1, 28, 28, 3))
    shapes = [jax.tree.map(lambda a: a.shape, jax.eval_shape(lambda m=m: m.init(jax.random.key(0), x)))
              for m in (vit, explicit)]
    assert shapes[0] == shapes[1]
    # A saved model block without the key (written before it existed) means no variant.
    legacy = {k: v for k, v in explicit_dict().items() if k != "variant"}
    assert vit_from_config(legacy, method="mae").width == 96


def explicit_dict():
    return base(image_size=28, patch_size=7, width=96, depth=4, num_heads=3).model.to_dict()


# -- the shipped configs --------------------------------------------------------------------------


def test_every_shipped_training_config_is_listed():
    assert TRAIN_CONFIGS == sorted(TODAY)


@pytest.mark.parametrize("name", sorted(TODAY))
def test_shipped_configs_resolve_to_todays_sizes(name):
    c = load(name)
    assert c.model.variant, f"{name} should name its size with model.variant"
    validate_train_config(c)
    assert tuple(c.model[k] for k in SIZE_FIELDS) == TODAY[name]
    saved = c.to_dict()["model"]  # what config.json records: the resolved sizes too
    assert tuple(saved[k] for k in SIZE_FIELDS) == TODAY[name]
    vit = vit_from_config(c.model)
    assert tuple(getattr(vit, k) for k in SIZE_FIELDS) == TODAY[name]
    # The unvalidated config builds the same ViT.
    assert tuple(getattr(vit_from_config(load(name).model), k) for k in SIZE_FIELDS) == TODAY[name]


def test_ablations_of_the_size_keep_their_sizes_and_can_use_variants(tmp_path):
    plan = make_plan(load("ablations.vit_size"), str(tmp_path / "a"))
    got = {tuple(r.train_config.model[k] for k in SIZE_FIELDS) for r in plan.runs}
    assert got == {(28, 4, 64, 2, 2, 4.0), (28, 4, 96, 4, 3, 4.0), (28, 4, 192, 6, 3, 4.0)}
    plan = make_plan(load("ablations.demo_mnist5k"), str(tmp_path / "b"))
    assert {tuple(r.train_config.model[k] for k in SIZE_FIELDS) for r in plan.runs} == {(28, 4, 64, 3, 2, 4.0)}

    a = ablation_config()
    a.train_config, a.eval_config = "configs/mae_mnist5k.py", "configs/eval_mnist5k.py"
    a.grid = dotted({"model.variant": ["mu/4", "Ti/7"]})
    plan = make_plan(a, str(tmp_path / "c"))
    assert [(r.train_config.model.width, r.train_config.model.patch_size) for r in plan.runs] == [(96, 4), (192, 7)]
    assert not os.listdir(tmp_path)


def test_train_py_names_the_conflict_before_loading_anything(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "--config=configs/mae_mnist5k.py", f"--workdir={workdir}",
         "--config.model.width=32"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: invalid training config: model.variant='mu/4' means model.width=96, but the config also sets "
        "model.width=32; drop that key, or set model.variant='' to give the sizes explicitly"]
    assert not workdir.exists()


# -- the converter --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, variant", [("vit_tiny", "Ti"), ("vit_small", "S"), ("vit_base", "B"),
                                           ("vit_large", "L"), ("vit_huge", "H")])
def test_the_converter_reads_the_same_table(arch, variant):
    spec, size = convert.parse_arch(f"{arch}_patch14_224")
    assert spec == convert.ModelSpec(**decode_variant(f"{variant}/14")) and size == 224
    assert convert.ARCHS[arch] == variant
    conv = convert.Converted({}, spec, 224, 224, "learned", None, [], [])
    config = convert.training_config(conv, "dino")  # total_steps 0: evaluation only, never validated
    vit = vit_from_config(config.model)  # as check_against_model and evaluation build it
    assert (vit.width, vit.depth, vit.num_heads, vit.patch_size, vit.mlp_ratio) == (
        *PRESETS[variant], 14, 4.0)


# -- resuming a run saved before the key ----------------------------------------------------------


def _saved_before_variant(name):
    """The config a run of ``name`` saved before model.variant existed: the explicit sizes, no key."""
    c = load(name)
    validate_train_config(c)
    saved = c.to_dict()
    del saved["model"]["variant"]
    return saved


@pytest.mark.parametrize("name", ["mae_mnist5k", "dino_mnist5k"])
def test_resuming_a_run_saved_without_the_key(name, tmp_path):
    saved = _saved_before_variant(name)
    c = load(name)  # now names its size: 'mu/4' / 'mu/7'
    validate_train_config(c)  # as train_and_evaluate does before the resume check
    check = config_history.check_resume(saved, c, 100, (), str(tmp_path))
    assert check.refused == [] and check.overridden == []
    assert check.bookkeeping == ["model.variant"]

    plain = load(name)
    plain.model.variant = ""  # a config spelling the sizes out, as before
    for k in ("patch_size", "width", "depth", "num_heads"):
        plain.model[k] = saved["model"][k]
    validate_train_config(plain)
    check = config_history.check_resume(saved, plain, 100, (), str(tmp_path))
    assert check.changes == {} and check.new_keys == {"model.variant": ""}

    # Another size is still refused, named by the size key (the variant itself is only a name).
    other = load(name)
    other.model.variant = f"Ti/{saved['model']['patch_size']}"
    validate_train_config(other)
    with pytest.raises(UserInputError, match=r"different config: model\.depth: 4 -> 12; model\.width: 96 -> 192\. "):
        config_history.check_resume(saved, other, 100, (), str(tmp_path))


def test_evaluation_rebuilds_a_model_saved_without_the_key():
    saved = ml_collections.ConfigDict(_saved_before_variant("dino_mnist5k"))
    config = config_defaults.fill_legacy_model_keys(saved)
    vit = vit_from_config(config.model, method="dino")
    assert isinstance(vit, ViT)
    assert tuple(getattr(vit, k) for k in SIZE_FIELDS) == TODAY["dino_mnist5k"]
