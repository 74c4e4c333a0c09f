"""List-valued config keys are tuples; the comma-string form still works, with one deprecation line."""

from __future__ import annotations

import logging
import os

import pytest
from absl import flags
from ml_collections import config_flags

from ssl_ad import config_lists
from ssl_ad.config_defaults import eval_config
from ssl_ad.config_lists import LIST_KEYS, as_names
from ssl_ad.errors import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(config_lists, "_warned", set())


def parse(*argv):
    fv = flags.FlagValues()
    argv = ["evaluate.py", f"--config={os.path.join(REPO, 'configs', 'eval_mnist5k.py')}", *argv]
    config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def test_defaults_are_tuples():
    c = eval_config()
    for key in LIST_KEYS:
        assert isinstance(c[key], tuple), key
    assert c.scorers == ("knn", "mahalanobis", "kmeans", "gmm_kmeans", "gmm", "mae_recon")


def test_tuple_and_single_string_need_no_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert as_names((" knn", "gmm ", ""), "scorers") == ("knn", "gmm")
        assert as_names("one_class", "protocols") == ("one_class",)
        assert as_names((), "pixel_maps") == () and as_names("", "pixel_maps") == () and as_names(None, "x") == ()
    assert caplog.text == ""


def test_comma_string_is_split_with_one_deprecation_line(caplog):
    with caplog.at_level(logging.WARNING):
        assert as_names("knn,gmm", "scorers") == ("knn", "gmm")
        assert as_names("knn,gmm", "scorers") == ("knn", "gmm")
        assert as_names(("runs/a,runs/b",), "checkpoint") == ("runs/a", "runs/b")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "config.scorers='knn,gmm'" in lines[0] and "deprecated" in lines[0]
    assert "--config.scorers=knn --config.scorers=gmm" in lines[0] and "('knn', 'gmm')" in lines[0]


def test_non_string_entry_is_a_user_error():
    with pytest.raises(UserInputError, match=r"config.scorers entries must be strings; got 3"):
        as_names(("knn", 3), "scorers")


def test_command_line_forms():
    assert parse("--config.checkpoint=runs/mae", "--config.checkpoint=runs/dino").checkpoint == ("runs/mae", "runs/dino")
    assert parse("--config.scorers=('knn', 'gmm')").scorers == ("knn", "gmm")
    assert parse("--config.protocols=one_class").protocols == ("one_class",)
    old = parse("--config.checkpoint=runs/mae,runs/dino").checkpoint  # the deprecated form
    assert as_names(old, "checkpoint") == ("runs/mae", "runs/dino")


def test_config_file_with_the_old_comma_string_still_loads():
    c = eval_config()
    c.scorers = "knn,mahalanobis"  # a config file written before tuples
    assert as_names(c.scorers, "scorers") == ("knn", "mahalanobis")
