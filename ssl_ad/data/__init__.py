"""Data: tfds builders, in-memory splits and tf.data training pipelines.

TensorFlow is only used for input pipelines; silence its start-up noise before
anything imports it (both variables are needed, see ENVIRONMENT.md).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
