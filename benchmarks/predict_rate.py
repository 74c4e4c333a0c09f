"""Images per second of predict.py (scoring new images against normal ones) on this machine.

  python benchmarks/predict_rate.py --checkpoint=runs/dino [--normal=2000 --new=1000] \
      [--image_px=28] [--scorer=knn] [--out=predict_rate.json]

Writes ``--normal`` training and ``--new`` test images of the embedded mnist5k digits as PNG files
(upscaled to ``--image_px`` pixels square, bicubic, so the decode and resize cost of larger
photographs can be seen) into a temporary folder, then runs
``ssl_ad.evaluation.predict.run_prediction`` twice on them with ``configs/predict.py``'s defaults
(the scorer fit on the normal images, the 5-fold out-of-fold threshold, the overlays):

* ``cold``: nothing cached (decode, embedding pass, scorer fits, overlays);
* ``warm``: the same output folder again, so the fingerprinted features are read from the cache.

For each it prints the wall seconds, prediction.json's ``new_images_per_second`` (new images /
whole-run seconds; the run also embeds the normal images), its embedding seconds, and the
process's CPU seconds (user + system, all threads) per new image, which is the steadier figure on
a machine shared with other jobs. The 1-minute load average before and after is recorded.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from bench_common import cpu_seconds, report_json  # noqa: E402
from configs import predict as predict_config  # noqa: E402
from ssl_ad.cli import setup_logging  # noqa: E402
from ssl_ad.data.sources import load_split  # noqa: E402
from ssl_ad.evaluation.predict import run_prediction  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", "runs/dino", "Training workdir to score with ('' = raw pixels).")
_NORMAL = flags.DEFINE_integer("normal", 2000, "Normal images the scorer is fit on (mnist5k train).")
_NEW = flags.DEFINE_integer("new", 1000, "New images scored (mnist5k test).")
_PX = flags.DEFINE_integer("image_px", 28, "Side of the PNG files written, in pixels (digits are 28 px).")
_SCORER = flags.DEFINE_string("scorer", "knn", "Feature scorer of predict.py.")
_OUT = flags.DEFINE_string("out", None, "Where the JSON results go (also printed).")


def _write_pngs(images, folder: str, px: int) -> None:
    os.makedirs(folder)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        if px != pil.size[0]:
            pil = pil.resize((px, px), Image.BICUBIC)
        pil.save(os.path.join(folder, f"{i:05d}.png"))


def main(argv) -> None:
    del argv
    setup_logging()  # predict.py's logging: each distinct warning once
    with tempfile.TemporaryDirectory() as tmp:
        data = ml_collections.ConfigDict({"name": "mnist5k", "data_dir": os.path.join(tmp, "tfds")})
        train, test = load_split(data, "train"), load_split(data, "test")
        _write_pngs(train.images[: _NORMAL.value], os.path.join(tmp, "normal"), _PX.value)
        _write_pngs(test.images[: _NEW.value], os.path.join(tmp, "new"), _PX.value)
        config = predict_config.get_config()
        config.checkpoint = _CHECKPOINT.value
        config.normal_dir, config.images = os.path.join(tmp, "normal"), os.path.join(tmp, "new")
        config.scorer = _SCORER.value
        out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "load_before": os.getloadavg()[0],
               "normal_images": _NORMAL.value, "new_images": _NEW.value, "image_px": _PX.value}
        for run in ("cold", "warm"):
            t0, c0 = time.perf_counter(), cpu_seconds()
            summary = run_prediction(config, os.path.join(tmp, "out"))
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            out[run] = {"wall_s": round(wall, 2), "new_images_per_s": round(summary["new_images_per_second"], 1),
                        "embed_s": round(summary["embed_seconds"], 2),
                        "cpu_s_per_new_image": round(cpu / _NEW.value, 5), "anomalous": summary["anomalous"]}
        out["load_after"] = os.getloadavg()[0]
    report_json(out, _OUT.value)


if __name__ == "__main__":
    app.run(main)
