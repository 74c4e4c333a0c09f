"""``python tests/train_with_hooks.py <train.py flags>``: train.py with the fault-injection hooks of
tests/hooks.py installed from the environment (see hooks.STEP_DELAY_ENV / NAN_FROM_STEP_ENV)."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app  # noqa: E402

import train  # noqa: E402
from ssl_ad.cli import parse_flags  # noqa: E402
from tests import hooks  # noqa: E402

if __name__ == "__main__":
    hooks.install_from_env()
    app.run(train.main, flags_parser=parse_flags)
