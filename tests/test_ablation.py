"""Ablation sweeps: grid expansion, up-front key validation, skip/resume, and the seed aggregation."""

import csv
import io
import itertools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys

import pytest

from ssl_ad.ablation import aggregate
from ssl_ad.ablation.grid import ablation_config, dotted, expand, make_plan, seeds_of
from ssl_ad.ablation.sweep import run_ablation
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation.report import write_results_json
from tests.conftest import REPO


def _ablation(data_dir="", **fields):
    c = ablation_config()
    c.train_config = "configs/mae_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.train_overrides = dotted({"model.variant": ""})  # settings give sizes instead of the config's "mu/4"
    c.data_dir = data_dir
    for key, value in fields.items():
        setattr(c, key, value)
    return c


def _tiny(data_dir, **fields):
    """Two MAE settings that train in seconds, and a one-scorer evaluation."""
    c = _ablation(data_dir, grid=dotted({"mae.mask_ratio": [0.5, 0.9]}), **fields)
    c.train_overrides = dotted({
        "total_steps": 20, "batch_size": 16, "log_every": 5, "checkpoint_every": 10,
        "model.variant": "", "model.width": 32, "model.depth": 2, "model.num_heads": 2,
        "mae.decoder_width": 32, "mae.decoder_heads": 2, "optim.warmup_steps": 5,
    })
    c.eval_overrides = dotted({"scorers": "knn", "protocols": "one_class", "tsne_points": 0, "pca_dims": 8,
                               "max_train_per_round": 60})
    return c


# ---------------------------------------------------------------------------------------------
# Expansion


def test_grid_is_the_cartesian_product_with_tuples_nested_keys_and_eval_axes():
    grid = dotted({
        "mae.mask_ratio": [0.5, 0.9],
        "data.crop_scale": [(0.2, 1.0), (0.5, 1.0)],  # a tuple is one value
        "eval.pooling": ["cls", "mean"],
    })
    settings = expand(_ablation(grid=grid))
    keys = ["data.crop_scale", "eval.pooling", "mae.mask_ratio"]  # ConfigDict order: sorted keys
    expected = [dict(zip(keys, combo)) for combo in itertools.product(
        [(0.2, 1.0), (0.5, 1.0)], ["cls", "mean"], [0.5, 0.9])]
    assert [s.overrides for s in settings] == expected
    assert settings[0].axes == (("data.crop_scale", (0.2, 1.0)), ("eval.pooling", "cls"), ("mae.mask_ratio", 0.5))
    assert settings[0].label == "crop_scale=(0.2, 1.0), pooling=cls, mask_ratio=0.5"
    assert len({s.slug for s in settings}) == 8
    assert all("/" not in s.slug and " " not in s.slug for s in settings)
    # eval.* keys are evaluation-only: settings differing only in them share one training run.
    assert settings[0].train_overrides == {"data.crop_scale": (0.2, 1.0), "mae.mask_ratio": 0.5}
    assert settings[0].eval_overrides == {"pooling": "cls"}
    assert settings[0].train_slug == settings[2].train_slug  # pooling cls / mean
    assert settings[0].eval_slug != settings[2].eval_slug
    assert len({s.train_slug for s in settings}) == 4

    # Nested dicts are dotted keys; a dict value is a group of overrides under its key.
    nested = dotted({"mae": {"mask_ratio": [0.5, 0.9]},
                     "model": [{"depth": 2, "width": 32}, {"depth": 4, "width": 64}]})
    settings = expand(_ablation(grid=nested))
    assert [s.overrides for s in settings] == [
        {"mae.mask_ratio": 0.5, "model.depth": 2, "model.width": 32},
        {"mae.mask_ratio": 0.5, "model.depth": 4, "model.width": 64},
        {"mae.mask_ratio": 0.9, "model.depth": 2, "model.width": 32},
        {"mae.mask_ratio": 0.9, "model.depth": 4, "model.width": 64},
    ]
    assert settings[1].axes[1] == ("model", {"depth": 4, "width": 64})


def test_explicit_settings_seeds_and_the_plan(tmp_path):
    listed = [
        {"_label": "small", "model.depth": 2, "model.width": 32, "model.num_heads": 2},
        {"model": {"depth": 4}, "mae.mask_ratio": 0.9},
        {},
    ]
    abl = _ablation(settings=listed, seeds=2)
    settings = expand(abl)
    assert [s.overrides for s in settings] == [
        {"model.depth": 2, "model.width": 32, "model.num_heads": 2},
        {"model.depth": 4, "mae.mask_ratio": 0.9},
        {},
    ]
    assert [s.label for s in settings] == ["small", "depth=4, mask_ratio=0.9", "base"]
    assert seeds_of(abl) == [0, 1] and seeds_of(_ablation(seeds=3)) == [0, 1, 2]

    plan = make_plan(abl, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # planning writes nothing
    # Seed-major: every setting at the first seed, then the next seed.
    assert [(r.setting.label, r.seed) for r in plan.runs] == [
        ("small", 0), ("depth=4, mask_ratio=0.9", 0), ("base", 0),
        ("small", 1), ("depth=4, mask_ratio=0.9", 1), ("base", 1)]
    first = plan.runs[0]
    assert first.train_config.seed == 0 and first.train_config.model.depth == 2
    assert first.train_config.model.width == 32 and first.train_config.mae.mask_ratio == 0.75  # base kept
    assert first.workdir == os.path.join(str(tmp_path / "out"), "runs", "small", "seed0")
    assert first.evaldir == os.path.join(first.workdir, "eval")
    assert first.eval_config.checkpoint == first.workdir
    assert first.eval_config.sources == ""  # no baselines unless asked for
    assert len({r.workdir for r in plan.runs}) == 6

    # An eval-only axis reuses the checkpoint of its training setting.
    plan = make_plan(_ablation(grid=dotted({"eval.pooling": ["cls", "mean"]}), seeds=2), str(tmp_path / "o2"))
    assert [r.workdir for r in plan.runs[:2]] == [os.path.join(str(tmp_path / "o2"), "runs", "base", "seed0")] * 2
    assert [os.path.basename(r.evaldir) for r in plan.runs[:2]] == ["eval-pooling-cls", "eval-pooling-mean"]
    assert [r.eval_config.pooling for r in plan.runs[:2]] == ["cls", "mean"]


@pytest.mark.parametrize("fields, match", [
    ({"grid": dotted({"mae.mask_ratio": [0.5]}), "settings": [{"mae.mask_ratio": 0.5}]}, "not both"),
    ({"grid": dotted({"seed": [0, 1]})}, "seeds"),
    ({"grid": dotted({"mae.mask_ratio": 0.5})}, "list of values"),
    ({"settings": [{"mae.mask_ratio": 0.5}, {"mae": {"mask_ratio": 0.5}}]}, "identical"),
    ({"seeds": 0}, "at least 1"),
    ({"seeds": True}, "at least 1"),
])
def test_malformed_ablation_configs_are_user_errors(fields, match):
    abl = _ablation(**fields)
    with pytest.raises(UserInputError, match=match):
        expand(abl)
        seeds_of(abl)


# ---------------------------------------------------------------------------------------------
# Validation before training


@pytest.mark.parametrize("field, value, key", [
    ("grid", dotted({"mae.mask_ratio": [0.5], "mae.mask_ratoi": [0.9]}), "mae.mask_ratoi"),
    ("grid", dotted({"eval.poolng": ["cls", "mean"]}), "eval.poolng"),
    ("settings", [{"mae.mask_ratio": 0.5}, {"model": {"depht": 2}}], "model.depht"),
    ("train_overrides", dotted({"optim.base_lrr": 1e-3}), "optim.base_lrr"),
    ("eval_overrides", dotted({"scorer_args.knn.kk": 3}), "scorer_args.knn.kk"),
])
def test_unknown_key_fails_before_any_training(tmp_path, field, value, key):
    out = tmp_path / "ablation"
    with pytest.raises(UserInputError, match=f"unknown key '{key}'"):
        run_ablation(_ablation(**{field: value}), str(out))
    assert not out.exists()  # no workdir, nothing trained


def test_wrong_value_type_fails_before_any_training(tmp_path):
    with pytest.raises(UserInputError, match="mae.norm_pix_loss"):
        run_ablation(_ablation(grid=dotted({"mae.norm_pix_loss": [True, 0]})), str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()


def test_cli_names_the_unknown_key_and_exits_2(tmp_path):
    # The demo sets mae.* keys, which the DINO training config does not have.
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "ablate.py", "--config=configs/ablations/demo_mnist5k.py", f"--outdir={out}",
         "--config.train_config=configs/dino_mnist5k.py"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: unknown key 'mae.") and "configs/dino_mnist5k.py" in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Skip / resume


def _mtimes(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_interrupted_sweep_skips_finished_runs_and_resumes_the_rest(tmp_path, data_dir, caplog):
    out = str(tmp_path / "sweep")
    abl = _tiny(data_dir)
    run1, run2 = make_plan(abl, out).runs

    def crash_in_second(event, run):
        # Run 1 is finished; run 2 dies between its step-10 and step-20 checkpoints.
        if event == "trained" and run.number == 2:
            shutil.rmtree(os.path.join(run.workdir, "checkpoints", "20"))
            raise RuntimeError("injected crash")

    with pytest.raises(RuntimeError, match="injected crash"):
        run_ablation(abl, out, hook=crash_in_second)
    assert os.path.exists(os.path.join(run1.evaldir, "results.json"))
    assert not os.path.exists(run2.evaldir) and not os.path.exists(os.path.join(out, "ablation.csv"))
    assert run_ablation(abl, out, dry_run=True)["statuses"] == ["done", "resume from step 10"]
    before = _mtimes(run1.workdir)

    events = []
    caplog.set_level(logging.INFO, logger="ssl_ad.train.loop")
    summary = run_ablation(abl, out, hook=lambda e, r: events.append((e, r.number)))
    assert summary["statuses"] == ["done", "done"] and summary["stopped"] is None
    assert events == [("done", 1), ("trained", 2), ("done", 2)]  # run 1 was not trained again ...
    assert _mtimes(run1.workdir) == before  # ... nor evaluated: not a file of it touched
    assert "Resumed from step 10" in caplog.text  # run 2 went on from its last checkpoint
    assert sorted(os.listdir(os.path.join(run2.workdir, "checkpoints"))) == ["10", "20"]
    with open(os.path.join(out, "ablation.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["mae.mask_ratio"], r["scorer"], r["protocol"]) for r in rows) == [
        ("0.5", "knn", "one_class"), ("0.9", "knn", "one_class")]
    assert all(r["feature"] == "checkpoint" and r["steps"] == "20" and float(r["train_seconds"]) > 0 for r in rows)
    md = open(os.path.join(out, "ablation.md")).read()
    assert "| mask_ratio=0.5 |" in md and "| mask_ratio=0.9 |" in md
    assert os.path.exists(os.path.join(out, "plots", "one_class_mask_ratio.png"))

    # Everything done: a rerun only rewrites the tables.
    snapshot = _mtimes(os.path.join(out, "runs"))
    assert run_ablation(abl, out)["statuses"] == ["done", "done"]
    assert _mtimes(os.path.join(out, "runs")) == snapshot

    # A different training config on the same outdir is refused before anything changes.
    changed = _tiny(data_dir)
    changed.train_overrides = dotted({**changed.train_overrides.to_dict(), "total_steps": 30})
    snapshot = _mtimes(out)
    with pytest.raises(UserInputError, match="total_steps"):
        run_ablation(changed, out)
    assert _mtimes(out) == snapshot


# ---------------------------------------------------------------------------------------------
# Aggregation over seeds (fabricated results, no training)


def _fabricate(run, values, pixels=0.6, steps=(10, 20, 30), seconds_per_step=(1.0, 0.5, 0.25), img_s=(10.0, 40.0, 60.0)):
    """results.json with the run's own feature (values: (protocol, scorer) -> AUROC) and a pixels row."""
    own = os.path.basename(run.workdir)
    rows = []
    for (protocol, scorer), auroc in values.items():
        for feature, value in ((own, auroc), ("pixels", pixels)):
            rows.append({"feature": feature, "scorer": scorer, "protocol": protocol, "mean_auroc": value,
                         "std_auroc": 0.01, "mean_aupr": 0.5, "per_round": {"0": value}, "fit_seconds": 0.1,
                         "score_seconds": 0.1, "warnings": []})
    write_results_json(os.path.join(run.evaldir, "results.json"), rows, {"config": {}, "total_seconds": 7.0})
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
        for step, sps, rate in zip(steps, seconds_per_step, img_s):
            f.write(json.dumps({"step": step, "loss": 1.0, "seconds_per_step": sps, "images_per_s": rate}) + "\n")


def test_table_aggregates_seeds_like_a_hand_computation(tmp_path):
    out = str(tmp_path / "agg")
    abl = _ablation(grid=dotted({"mae.mask_ratio": [0.5, 0.9]}), seeds=3)
    plan = make_plan(abl, out)
    auroc = {}
    for run in plan.runs:
        ratio = run.setting.overrides["mae.mask_ratio"]
        if ratio == 0.9 and run.seed == 2:
            continue  # still pending: its cells have n=2
        for protocol in ("one_class", "leave_one_class_out"):
            for j, scorer in enumerate(("knn", "mahalanobis")):
                auroc[(ratio, run.seed, protocol, scorer)] = 0.5 + 0.1 * ratio + 0.03 * run.seed ** 2 + 0.01 * j
        _fabricate(run, {(p, s): auroc[(ratio, run.seed, p, s)]
                         for p in ("one_class", "leave_one_class_out") for s in ("knn", "mahalanobis")})

    records = aggregate.collect(plan)
    summary = {(s["protocol"], s["setting"], s["scorer"]): s for s in aggregate.summarise(records)}
    assert len(summary) == 2 * 2 * 2
    for (ratio, seeds) in ((0.5, [0, 1, 2]), (0.9, [0, 1])):
        for protocol in ("one_class", "leave_one_class_out"):
            for scorer in ("knn", "mahalanobis"):
                vals = [auroc[(ratio, k, protocol, scorer)] for k in seeds]
                s = summary[(protocol, f"mask_ratio={ratio}", scorer)]
                assert s["n"] == len(seeds) and s["seeds"] == seeds
                assert s["mean"] == pytest.approx(statistics.fmean(vals))
                assert s["std"] == pytest.approx(statistics.pstdev(vals))
    assert {r["feature"] for r in records if r["status"] == "done"} == {"checkpoint"}  # pixels left out

    # Training cost: 30 steps, 10*1 + 10*0.5 + 10*0.25 s, images/s without the compile interval.
    cost = aggregate.cost_by_setting(records)
    assert cost[0] == {"steps": 30.0, "train_seconds": 17.5, "images_per_s": 50.0, "diverged": 0, "pending": 0}
    assert cost[1]["pending"] == 1

    paths = aggregate.write_outputs(plan, command="python ablate.py ...")
    md = open(paths["markdown"]).read()
    vals = [auroc[(0.5, k, "one_class", "knn")] for k in (0, 1, 2)]
    assert f"{statistics.fmean(vals):.3f} ± {statistics.pstdev(vals):.3f}" in md
    vals9 = [auroc[(0.9, k, "one_class", "mahalanobis")] for k in (0, 1)]
    assert f"{statistics.fmean(vals9):.3f} ± {statistics.pstdev(vals9):.3f}** (n=2)" in md  # best mean, 2 seeds
    assert "## Protocol: one_class" in md and "## Protocol: leave_one_class_out" in md
    assert "| 30 | 18s | 50 |" in md and "Not finished yet: mask_ratio=0.9 seed=2" in md
    rows = list(csv.DictReader(io.StringIO(open(paths["csv"]).read())))
    assert len(rows) == 5 * 2 * 2 + 1  # 5 finished runs × protocols × scorers, + the pending run
    assert {"mae.mask_ratio", "seed", "auroc", "steps", "train_seconds", "images_per_s"} <= set(rows[0])
    for protocol in ("one_class", "leave_one_class_out"):
        assert os.path.getsize(os.path.join(out, "plots", f"{protocol}_mask_ratio.png")) > 1000

    # Baselines on demand: pixels becomes a feature row of the table.
    abl.baselines = True
    plan = make_plan(abl, out)
    records = aggregate.collect(plan)
    assert {r["feature"] for r in records if r["status"] == "done"} == {"checkpoint", "pixels"}
    md = aggregate.markdown_text(plan, records, [])
    assert "| setting | feature | knn | mahalanobis |" in md
    assert "| mask_ratio=0.5 | pixels | **0.600 ± 0.000** |" in md  # ties are all bold


def test_list_mode_and_non_numeric_axes_get_categorical_plots(tmp_path):
    out = str(tmp_path / "cat")
    plan = make_plan(_ablation(settings=[{"_label": "small", "model.depth": 2}, {"_label": "big", "model.depth": 6}],
                               seeds=2), out)
    for run in plan.runs:
        _fabricate(run, {("one_class", "knn"): 0.7 + 0.1 * run.setting.index + 0.01 * run.seed})
    aggregate.write_outputs(plan)
    assert os.path.getsize(os.path.join(out, "plots", "one_class_setting.png")) > 1000
    md = open(os.path.join(out, "ablation.md")).read()
    assert "| small | 0.705 ± 0.005 |" in md and "| big | **0.805 ± 0.005** |" in md

    out = str(tmp_path / "bool")
    plan = make_plan(_ablation(grid=dotted({"mae.norm_pix_loss": [True, False], "eval.pooling": ["cls", "mean"]})), out)
    for run in plan.runs:
        _fabricate(run, {("one_class", "knn"): 0.6 + 0.1 * run.setting.index})
    aggregate.write_outputs(plan)
    assert sorted(os.listdir(os.path.join(out, "plots"))) == ["one_class_norm_pix_loss.png", "one_class_pooling.png"]
