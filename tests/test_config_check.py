"""Config values are checked before anything is loaded or written (ssl_ad.config_check).

The issue's settings (mae.mask_ratio 0.0 and 1.5, dino.teacher_temp 0) are refused by train.py with
exit code 2 and one line naming the key, the value and the allowed range; every numeric key of every
shipped config has a rule; every shipped config and ablation plan passes.
"""

import glob
import importlib
import os
import subprocess
import sys

import ml_collections
import pytest

from ssl_ad import config_check
from ssl_ad.config_check import (
    EVAL_LINKS,
    RULES,
    TRAIN_LINKS,
    Int,
    Number,
    numeric_keys,
    validate_eval_config,
    validate_train_config,
    violations,
)
from ssl_ad.errors import UserInputError
from tests.conftest import REPO, apply_overrides, tiny_mae_config

ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
CONFIG_NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))
ABLATIONS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "ablations", "*.py")))


def load(name):
    return importlib.import_module(f"configs.{name}").get_config()


def is_eval(name):
    return name.startswith("eval")


# ---------------------------------------------------------------------------------------------
# The issue's values through the real entry point.


ISSUE_CASES = [
    ("mae", "--config.mae.mask_ratio=0.0", "mae.mask_ratio=0.0 (allowed: a number in (0, 1))"),
    ("mae", "--config.mae.mask_ratio=1.5", "mae.mask_ratio=1.5 (allowed: a number in (0, 1))"),
    ("dino", "--config.dino.teacher_temp=0", "dino.teacher_temp=0.0 (allowed: a number > 0)"),
]


def test_train_py_refuses_meaningless_values_before_writing_anything(tmp_path):
    procs = []
    for i, (method, flag, _) in enumerate(ISSUE_CASES):  # three processes at once: the imports dominate
        workdir, data_dir = tmp_path / f"run{i}", tmp_path / f"data{i}"
        cmd = [sys.executable, "train.py", f"--config=configs/{method}_mnist5k.py", f"--workdir={workdir}",
               f"--config.data.data_dir={data_dir}", flag]
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True), workdir, data_dir))
    for (proc, workdir, data_dir), (_, _, expected) in zip(procs, ISSUE_CASES):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        assert err.strip().splitlines() == [f"error: invalid training config: {expected}"]
        assert not workdir.exists() and not data_dir.exists()  # nothing loaded or written


def test_evaluate_py_refuses_bad_values_before_writing_anything(tmp_path):
    outdir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--config=configs/eval_mnist5k.py", f"--outdir={outdir}",
         "--config.pca_dims=-1", "--config.scorer_args.kmeans.k_range=(5, 2)"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "error: invalid evaluation config: pca_dims=-1 (allowed: an integer >= 0); "
        "scorer_args.kmeans.k_range=(5, 2) (allowed: (lo, hi) integers with 1 <= lo <= hi)"
    ]
    assert not outdir.exists()


def test_an_existing_workdir_is_untouched(tmp_path):
    from ssl_ad.train.loop import train_and_evaluate

    (tmp_path / "config.json").write_text("{}")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserInputError, match=r"^invalid training config: optim.base_lr=0.0 "):
        train_and_evaluate(tiny_mae_config(str(tmp_path / "data"), **{"optim.base_lr": 0.0}), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "config.json").read_text() == "{}"


def test_every_violation_in_one_line():
    c = tiny_mae_config("", **{"mae.mask_ratio": 1.0, "optim.b2": 1.0, "data.crop_scale": (0.9, 0.2),
                               "model.patch_size": 5, "total_steps": 0})
    with pytest.raises(UserInputError) as e:
        validate_train_config(c)
    message = str(e.value)
    assert "\n" not in message and message.startswith("invalid training config: ")
    for part in ("total_steps=0 (allowed: an integer >= 1)",
                 "data.crop_scale=(0.9, 0.2) (allowed: (lo, hi) with 0 < lo <= hi <= 1)",
                 "optim.b2=1.0 (allowed: a number in [0, 1))",
                 "mae.mask_ratio=1.0 (allowed: a number in (0, 1))",
                 "model.image_size=28, model.patch_size=5 (model.image_size must be a multiple of model.patch_size)"):
        assert part in message, message


# ---------------------------------------------------------------------------------------------
# The rules themselves.


@pytest.mark.parametrize(("rule", "good", "bad"), [
    (Number("(0, 1)"), [1e-9, 0.5, 0.999], [0, 0.0, 1, 1.0, -0.1, float("nan"), float("inf"), True, "0.5", None]),
    (Number("[0, 1)"), [0, 0.0, 0.99], [1.0, -1e-9]),
    (Number("[0, 1]"), [0.0, 1.0, 1], [1.0001]),
    (Number("(0, inf)"), [1e-12, 1e9], [0.0, float("inf")]),
    (Int("[1, inf)"), [1, 10**9], [0, 1.0, 2.5, True]),
    (Int("[-1, inf)"), [-1, 0], [-2]),
    (config_check.CROP_SCALE, [(0.2, 1.0), (0.5, 0.5), [0.1, 0.4]], [(0.0, 1.0), (0.5, 0.2), (0.2, 1.1), (0.2,), 0.5]),
    (config_check.K_RANGE, [(1, 10), (3, 3)], [(0, 10), (5, 2), (1.0, 10)]),
    (RULES["data.color_jitter"], [(0.4, 0.4, 0.2, 0.1), (0, 0, 0, 0.5)],
     [(0.4, 0.4, 0.2, 0.6), (-0.1, 0, 0, 0), (0.4,)]),
    (RULES["method"], ["mae", "dino"], ["MAE", "simclr", 1]),
])
def test_rule_bounds(rule, good, bad):
    for v in good:
        assert rule.ok(v), (rule.describe(), v)
    for v in bad:
        assert not rule.ok(v), (rule.describe(), v)


def test_descriptions_name_the_range():
    assert Number("(0, 1)").describe() == "a number in (0, 1)"
    assert Number("[0, 1)").describe() == "a number in [0, 1)"
    assert Number("(0, inf)").describe() == "a number > 0"
    assert Int("[1, inf)").describe() == "an integer >= 1"
    assert Number("[0, 0.5]").describe() == "a number in [0, 0.5]"


def test_absent_keys_are_skipped_and_unknown_keys_are_fine():
    old = ml_collections.ConfigDict({"method": "mae", "total_steps": 10, "model": {"width": 64}})
    validate_train_config(old)  # an old config without most keys
    validate_train_config(ml_collections.ConfigDict({"some_new_key": -5.0, "total_steps": 3}))


def test_eval_config_rules():
    c = load("eval_mnist5k")
    validate_eval_config(c)
    apply_overrides(c, {"pca_dims": -1, "scorer_args.knn.k": 0, "scorer_args.kmeans.k_range": (4, 2),
                        "scorer_args.gmm_kmeans.drop_fraction": 1.0, "pixel.max_fpr": 0.0})
    with pytest.raises(UserInputError) as e:
        validate_eval_config(c)
    for key in ("pca_dims=-1", "scorer_args.knn.k=0", "scorer_args.kmeans.k_range=(4, 2)",
                "scorer_args.gmm_kmeans.drop_fraction=1.0", "pixel.max_fpr=0.0"):
        assert key in str(e.value)


# ---------------------------------------------------------------------------------------------
# Coverage: a numeric key without a rule cannot slip in.


def test_every_numeric_key_of_every_shipped_config_has_a_rule():
    missing = {}  # key -> configs that have it
    for name in CONFIG_NAMES:
        for key in numeric_keys(load(name)):
            if key not in RULES:
                missing.setdefault(key, []).append(f"configs/{name}.py")
    assert not missing, (
        "numeric config keys without a range rule in ssl_ad/config_check.py RULES (add one per key): "
        + "; ".join(f"{key} (in {', '.join(names)})" for key, names in sorted(missing.items()))
    )


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_shipped_config_is_valid(name):
    assert violations(load(name), EVAL_LINKS if is_eval(name) else TRAIN_LINKS) == []


def test_every_shipped_ablation_plan_is_valid(tmp_path):
    from ssl_ad.ablation.grid import make_plan

    for name in ABLATIONS:
        make_plan(load(f"ablations.{name}"), str(tmp_path / name))  # validates every run's configs
    assert not os.listdir(tmp_path)  # making a plan writes nothing


def test_an_ablation_setting_out_of_range_is_named(tmp_path):
    from ssl_ad.ablation.grid import dotted, make_plan

    ablation = load("ablations.mae_mask_ratio")
    ablation.grid = dotted({"mae.mask_ratio": [0.5, 1.0]})
    with pytest.raises(UserInputError, match=r"grid setting 'mask_ratio=1(\.0)?': invalid training config: "
                                             r"mae\.mask_ratio=1\.0 \(allowed: a number in \(0, 1\)\)"):
        make_plan(ablation, str(tmp_path / "out"))
