"""An anomaly-detection monitor for training: kNN AUROC of the current encoder on a validation split.

The evaluator DINO's and big_vision's trainers run for classification (a kNN / linear probe on a
held-out split every few epochs), here for anomaly detection: every ``monitor.every_steps`` steps
the encoder that evaluation would use (``method.encoder_params(..., 'default')``: the DINO
teacher, the MAE encoder) embeds

* a **memory bank**: at most ``monitor.max_bank`` images of the training split, stratified by
  class and fixed for the run (seed 0), and
* the **validation split**: ``data.val_fraction`` of the training split, carved per class with a
  fixed seed (see :func:`ssl_ad.data.split.carve_validation`), so that every run and every seed is
  measured on the same images. The test split is never read.

and each protocol's rounds (``one_class``, ``leave_one_class_out``; :mod:`ssl_ad.evaluation.protocols`)
fit a kNN scorer (cosine, k=2, PCA to ``monitor.pca_dims``: the evaluation defaults) on the bank's
normals and score the validation images. The means over rounds are logged as
``val_auroc/<protocol>``. Train on ``data.train_split='train:fit'`` (the training split without the
validation images) for a clean validation number; with the whole training split the monitor still
runs and says once that the validation images are also trained on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ssl_ad.config_lists import as_names
from ssl_ad.data.pipeline import preprocess_eval
from ssl_ad.data.sources import load_split
from ssl_ad.data.split import FIT_SUFFIX, VAL_SUFFIX, ImageSplit, base_split_name, stratified_subset
from ssl_ad.evaluation import embedding, metrics
from ssl_ad.evaluation.protocols import make_rounds
from ssl_ad.evaluation.scorers import build_scorer
from ssl_ad.methods.base import Method
from ssl_ad.models.vit import vit_from_config

log = logging.getLogger(__name__)

METRIC_PREFIX = "val_auroc/"


class ADMonitor:
    """kNN AUROC on the validation split; ``monitor(method, params, extra) -> {'val_auroc/<protocol>': mean}``.

    Args:
      config: the training config (``model``, ``data``, ``method``, ``monitor`` blocks).
      bank: ImageSplit of training images (uint8 (N, H, W, 3), labels (N,)) the scorer is fit on.
      val: ImageSplit of validation images scored each time.
    """

    def __init__(self, config: Any, bank: ImageSplit, val: ImageSplit):
        mon = config.monitor
        self.every_steps = int(mon.every_steps)
        self.protocols = as_names(mon.protocols, "monitor.protocols")
        self.pooling = str(mon.pooling)
        self.k, self.metric, self.pca_dims = int(mon.k), str(mon.metric), int(mon.pca_dims) or None
        self.batch_size = int(mon.batch_size)
        self.model = vit_from_config(config.model, method=config.method, drop_path_rate=0.0)
        size, norm = config.model.image_size, config.data
        self.bank, self.val = bank, val
        self.bank_x = preprocess_eval(bank.images, size, norm.mean, norm.std)
        self.val_x = preprocess_eval(val.images, size, norm.mean, norm.std)
        self.rounds = {}
        for protocol in self.protocols:
            skipped: dict[str, str] = {}
            self.rounds[protocol] = make_rounds(protocol, bank.labels, val.labels, bank.class_names, skipped=skipped)
            if skipped:
                log.info("monitor %s: rounds skipped: %s", protocol, skipped)

    @classmethod
    def from_config(cls, config: Any) -> ADMonitor | None:
        """The monitor of a training config, or None when ``monitor.every_steps`` is 0.

        Raises:
          UserInputError: when the training split cannot be carved (see ``carve_validation``).
        """
        if int(config.monitor.every_steps) <= 0:
            return None
        base = base_split_name(str(config.data.train_split))
        if not str(config.data.train_split).endswith(FIT_SUFFIX):
            log.warning("monitor: data.train_split=%r includes the validation images %r; train on %r for a "
                        "held-out validation AUROC.", config.data.train_split, base + VAL_SUFFIX, base + FIT_SUFFIX)
        fit = load_split(config.data, base + FIT_SUFFIX)
        val = load_split(config.data, base + VAL_SUFFIX)
        bank = stratified_subset(fit, int(config.monitor.max_bank), seed=0)
        log.info("monitor: every %d steps, kNN AUROC of %d validation images against a bank of %d training images",
                 int(config.monitor.every_steps), len(val), len(bank))
        return cls(config, bank, val)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether ``step`` (completed updates) is a monitoring step: every ``every_steps`` and the last."""
        return self.every_steps > 0 and (step % self.every_steps == 0 or step == total_steps)

    def __call__(self, method: Method, params: Any, extra: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        enc = method.encoder_params(params, extra, "default")
        bank = embedding.embed_images(self.model, enc, self.bank_x, self.pooling, self.batch_size)
        val = embedding.embed_images(self.model, enc, self.val_x, self.pooling, self.batch_size)
        out = {}
        for protocol, rounds in self.rounds.items():
            aucs = []
            for rnd in rounds:
                scorer = build_scorer("knn", k=self.k, metric=self.metric, pca_dims=self.pca_dims)
                scorer.fit(bank[rnd.train_idx])
                aucs.append(metrics.auroc(rnd.test_is_anomaly, scorer.score(val[rnd.test_idx])))
            out[METRIC_PREFIX + protocol] = float(np.mean(aucs)) if aucs else float("nan")
        out["val_seconds"] = time.perf_counter() - t0
        return out
