"""Record TensorFlow's RandAugment ops, as DeepMind's Perceiver IO ImageNet training ran them, into
``tests/data/randaugment_tf_reference.npz`` (read by ``tests/data/test_randaugment_tf_parity.py``).

Needs TensorFlow and tf-models-official (not installed by this project, not run in CI); in a separate
environment::

    python -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu numpy pillow scikit-learn ml-collections
    /tmp/tfenv/bin/pip install --no-deps tf-models-official     # its ops module needs only tf and tf_keras
    /tmp/tfenv/bin/pip install tf-keras pyyaml
    /tmp/tfenv/bin/python scripts/make_randaugment_tf_reference.py

Recorded with tensorflow-cpu 2.21.0 and tf-models-official 2.20.0 (Python 3.11).

DeepMind's ``perceiver/train/autoaugment.py`` is the TF TPU ``autoaugment.py`` whose ops now live in
tf-models-official's ``official/vision/ops/augment.py``. The op functions there are called directly, with
DeepMind's settings where the two differ:

- geometric ops (Rotate, ShearX/Y, TranslateX/Y): DeepMind calls ``tensorflow_addons.image``, i.e.
  ``ImageProjectiveTransformV3`` with nearest-neighbour sampling and a *constant* 0 fill that
  ``unwrap`` turns into grey 128; tf-models' ``transform`` defaults to ``fill_mode="reflect"``, so the
  fill mode is passed explicitly here;
- Contrast: DeepMind blends from a constant grey of ``sum(grey histogram) / 256`` (pixel count / 256);
  tf-models calls ``tf.image.adjust_contrast`` (per-channel mean). The DeepMind formula is written below
  with TF ops;
- Cutout: the centre, drawn at random inside the op, is passed in (the same masking function).

(tf-models' ``RandAugment`` class also draws among 17 branches, the 16 ops and an identity; DeepMind's
draws among the 16 ops. That is a property of the layer loop, not of an op, and is not recorded here.)

The two test images are natural photographs: scikit-learn's bundled ``china.jpg`` and ``flower.jpg``
decoded with Pillow and shrunk (Pillow bicubic) to 24×24 and 20×28, so the file stays small. They are
stored in the file, so the test does not depend on a JPEG decoder. Translate and Cutout are recorded with
``translate_const=10`` and ``cutout_const=8`` (shifts of 2/5/10 pixels, squares of half side 1/4/8 at
magnitudes 2/5/10), which suits the small images; the level-to-argument table is recorded separately
with the defaults (100 and 40).
"""

from __future__ import annotations

import math
import os
import sys
import types
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import official
import tensorflow as tf

# official/vision/__init__.py imports the task and config packages (gin, tensorflow-datasets, ...);
# the ops module itself needs none of them, so it is loaded from the package folder directly.
_vision = types.ModuleType("official.vision")
_vision.__path__ = [os.path.join(os.path.dirname(official.__file__), "vision")]
sys.modules["official.vision"] = _vision
_configs = types.ModuleType("official.vision.configs")
_common = types.ModuleType("official.vision.configs.common")
_common.SSDRandomCropParam = _common.SSDRandomCrop = object  # only annotations of an unrelated class
_configs.common = _common
sys.modules.update({"official.vision.configs": _configs, "official.vision.configs.common": _common})
from official.vision.ops import augment as tfm_augment

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "randaugment_tf_reference.npz"
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
MAGNITUDES = (2, 5, 10)
TRANSLATE_CONST, CUTOUT_CONST = 10.0, 8.0
GREY = [128, 128, 128]  # DeepMind's replace value


def level_arguments(magnitude: float, translate_const: float = 100.0, cutout_const: float = 40.0) -> dict:
    """DeepMind's ``level_to_arg`` at ``magnitude`` (0..10), before the random sign of the signed ops."""
    level = magnitude / 10.0
    enhance = level * 1.8 + 0.1
    return {
        "Rotate": level * 30.0, "ShearX": level * 0.3, "ShearY": level * 0.3,
        "TranslateX": level * translate_const, "TranslateY": level * translate_const,
        "Posterize": int(level * 4), "Solarize": int(level * 256), "SolarizeAdd": int(level * 110),
        "Cutout": int(level * cutout_const),
        "Color": enhance, "Contrast": enhance, "Brightness": enhance, "Sharpness": enhance,
    }


def _warp(image: tf.Tensor, transform: tf.Tensor) -> tf.Tensor:
    """tensorflow_addons.image.transform on the wrapped image: nearest, constant 0 fill, then grey."""
    warped = tfm_augment.transform(tfm_augment.wrap(image), transforms=transform, interpolation="nearest",
                               fill_mode="constant", fill_value=0.0)
    return tfm_augment.unwrap(warped, GREY)


def _deepmind_contrast(image: tf.Tensor, factor: float) -> tf.Tensor:
    grey = tf.cast(tf.image.rgb_to_grayscale(image), tf.int32)
    count = tf.reduce_sum(tf.cast(tf.histogram_fixed_width(grey, [0, 255], nbins=256), tf.float32))
    level = tf.cast(tf.clip_by_value(tf.ones_like(grey, tf.float32) * (count / 256.0), 0.0, 255.0), tf.uint8)
    return tfm_augment.blend(tf.image.grayscale_to_rgb(level), image, factor)


def apply(op: str, image: np.ndarray, magnitude: float, sign: float = 1.0, center=(0, 0)) -> np.ndarray:
    """One op, DeepMind semantics, on ``uint8 [H, W, 3]``."""
    img = tf.constant(image, tf.uint8)
    h, w = image.shape[:2]
    arg = level_arguments(magnitude, TRANSLATE_CONST, CUTOUT_CONST).get(op)
    if op in SIGNED:
        arg = sign * arg
    if op == "AutoContrast":
        out = tfm_augment.autocontrast(img)
    elif op == "Equalize":
        out = tfm_augment.equalize(img)
    elif op == "Invert":
        out = tfm_augment.invert(img)
    elif op == "Posterize":
        out = tfm_augment.posterize(img, arg)
    elif op == "Solarize":
        out = tfm_augment.solarize(img, arg)
    elif op == "SolarizeAdd":
        out = tfm_augment.solarize_add(img, arg)
    elif op == "Color":
        out = tfm_augment.color(img, arg)
    elif op == "Contrast":
        out = _deepmind_contrast(img, arg)
    elif op == "Brightness":
        out = tfm_augment.brightness(img, arg)
    elif op == "Sharpness":
        out = tfm_augment.sharpness(img, arg)
    elif op == "Rotate":
        radians = tf.constant(arg * math.pi / 180.0, tf.float32)
        out = _warp(img, tfm_augment._convert_angles_to_transform(radians, tf.constant(float(w)), tf.constant(float(h))))
    elif op == "ShearX":
        out = _warp(img, tf.constant([[1.0, arg, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]))
    elif op == "ShearY":
        out = _warp(img, tf.constant([[1.0, 0.0, 0.0, arg, 1.0, 0.0, 0.0, 0.0]]))
    elif op == "TranslateX":
        out = _warp(img, tfm_augment._convert_translation_to_transform([-arg, 0.0]))
    elif op == "TranslateY":
        out = _warp(img, tfm_augment._convert_translation_to_transform([0.0, -arg]))
    elif op == "Cutout":
        out = tfm_augment._fill_rectangle(img, tf.constant(center[1]), tf.constant(center[0]), arg, arg, GREY)
    else:
        raise ValueError(op)
    return out.numpy()


def _images() -> dict[str, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().filenames  # 640×427 JPEGs shipped with scikit-learn
    with Image.open(china) as im:
        a = im.convert("RGB").crop((160, 60, 400, 300)).resize((24, 24), Image.Resampling.BICUBIC)
    with Image.open(flower) as im:
        b = im.convert("RGB").crop((180, 60, 460, 260)).resize((28, 20), Image.Resampling.BICUBIC)
    return {"china": np.asarray(a), "flower": np.asarray(b)}


def main() -> None:
    images = _images()
    out: dict[str, np.ndarray] = {f"input/{k}": v for k, v in images.items()}
    grid = np.arange(0, 10.01, 0.25)
    table = [[level_arguments(float(m))[op] for op in OPS if op in level_arguments(0.0)] for m in grid]
    out["levels/magnitude"] = grid
    out["levels/ops"] = np.array([op for op in OPS if op in level_arguments(0.0)])
    out["levels/arguments"] = np.array(table, dtype=np.float64)
    # TF's smoothed (Sharpness degenerate) value of a flat 3×3 area of every level: its float32 sum is
    # one level short for some levels (factor 0 returns the degenerate itself)
    flat = [tfm_augment.sharpness(tf.fill([3, 3, 3], tf.constant(v, tf.uint8)), 0.0).numpy()[1, 1, 0] for v in range(256)]
    out["sharpness/flat_levels"] = np.array(flat, dtype=np.uint8)
    for name, img in images.items():
        h, w = img.shape[:2]
        for op in OPS:
            for m in MAGNITUDES:
                if op in SIGNED:
                    for sign in (1, -1):
                        out[f"{name}/{op}/{m}/{sign:+d}"] = apply(op, img, m, sign=sign)
                elif op == "Cutout":
                    for cy, cx in ((h // 3, w // 2), (h - 2, 1)):
                        out[f"{name}/{op}/{m}/{cy}_{cx}"] = apply(op, img, m, center=(cy, cx))
                else:
                    out[f"{name}/{op}/{m}"] = apply(op, img, m)
    from importlib.metadata import version

    out["versions"] = np.array([f"tensorflow {tf.__version__}", f"tf-models-official {version('tf-models-official')}",
                                f"python {sys.version.split()[0]}"])
    np.savez_compressed(OUT, **out)
    print(f"{OUT}: {len(out)} arrays, {OUT.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
