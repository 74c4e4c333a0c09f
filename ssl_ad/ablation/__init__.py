"""Ablations: sweep training (and evaluation) settings × seeds and compare anomaly-detection AUROC.

``grid`` expands and validates an ablation config into a plan of runs,
``sweep`` trains/evaluates each run (skipping finished ones, resuming
unfinished ones) and ``aggregate`` writes ablation.csv, ablation.md and plots.
Entry point: ``python ablate.py --config=configs/ablations/<name>.py --outdir=...``.
"""

from ssl_ad.ablation.grid import Plan, Run, Setting, ablation_config, dotted, expand, make_plan, seeds_of
from ssl_ad.ablation.sweep import run_ablation

__all__ = ["Plan", "Run", "Setting", "ablation_config", "dotted", "expand", "make_plan", "run_ablation", "seeds_of"]
