"""Record TensorFlow's JPEG decoding, as DeepMind's ImageNet pipeline decodes, into
``tests/data/jpeg_tf_reference.npz`` (read by ``tests/data/test_jpeg_tf_parity.py``).

Needs TensorFlow (not installed by this project, not run in CI); in a separate environment::

    python -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu numpy pillow scikit-learn simplejpeg
    /tmp/tfenv/bin/python scripts/make_jpeg_tf_reference.py

Recorded with tensorflow-cpu 2.21.0, Pillow 13.0.0, simplejpeg 1.9.0 (Python 3.11).

Small JPEG files are encoded here from natural photographs (scikit-learn's ``china.jpg`` and ``flower.jpg``,
cut to a few dozen pixels a side) and from the digits data set (sharp edges), covering chroma subsampling
4:2:0, 4:2:2, 4:4:4, 4:4:0 and 4:1:1, qualities 75 to 95, progressive scans, restart markers, greyscale, CMYK
with and without an Adobe marker, an EXIF orientation tag, junk bytes before the end marker, odd and tiny
sizes. For each file the npz holds its bytes, ``tf.io.decode_jpeg(channels=3)`` and
``tf.io.decode_and_crop_jpeg(channels=3)`` for a set of crop windows chosen to meet libjpeg-turbo's cropped
decode where it differs from cutting the full decode (left edges on and off the 16-pixel iMCU grid, strips of
even and odd width, one- and two-column windows, windows touching the right edge), stored as its difference
from the cut full decode (int16, the windows one after another), with TF's default ``dct_method`` and
``fancy_upscaling`` as DeepMind calls them.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import simplejpeg
import tensorflow as tf
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "jpeg_tf_reference.npz"


def pillow(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def files() -> dict[str, bytes]:
    china, flower = load_sample_images().images
    digits = load_digits().images  # [1797, 8, 8] in 0..16
    mosaic = np.zeros((48, 72), np.uint8)
    for i in range(6 * 9):
        r, c = divmod(i, 9)
        mosaic[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] = np.rint(digits[i] * 255 / 16)
    sharp = np.stack([mosaic, 255 - mosaic, np.roll(mosaic, 3, axis=1)], axis=-1)
    out = {
        "china_420_q75_41x53": pillow(china[200:241, 300:353], quality=75, subsampling=2),
        "flower_422_q95_40x64": pillow(flower[150:190, 200:264], quality=95, subsampling=1),
        "china_444_q90_33x47": pillow(china[100:133, 400:447], quality=90, subsampling=0),
        "flower_420_q90_progressive_37x51": pillow(flower[250:287, 300:351], quality=90, subsampling=2,
                                                   progressive=True),
        "china_grey_q90_30x44": pillow(np.asarray(Image.fromarray(china[50:80, 60:104]).convert("L")), quality=90),
        "flower_440_q85_32x48": simplejpeg.encode_jpeg(np.ascontiguousarray(flower[100:132, 100:148]), 85, "RGB",
                                                       "440"),
        "china_411_q85_32x56": simplejpeg.encode_jpeg(np.ascontiguousarray(china[300:332, 100:156]), 85, "RGB",
                                                      "411"),
        "digits_420_q95_47x71": pillow(sharp[:47, :71], quality=95, subsampling=2),
        "digits_422_q80_48x66": pillow(sharp[:, 3:69], quality=80, subsampling=1),
        "china_420_q80_restarts_32x80": pillow(china[150:182, 150:230], quality=80, subsampling=2,
                                               restart_marker_blocks=2),
        "tiny_420_5x3": pillow(china[200:205, 300:303], quality=90, subsampling=2),
        "tiny_422_3x9": pillow(flower[200:203, 300:309], quality=90, subsampling=1),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": TF (and we) ignore it
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(china[120:150, 200:240])).save(buffer, format="JPEG", quality=90,
                                                                         exif=exif.tobytes())
    out["china_420_exif_orientation6_30x40"] = buffer.getvalue()
    junk = pillow(flower[300:336, 400:450], quality=85, subsampling=2)
    out["flower_420_junk_before_eoi_36x50"] = junk[:-2] + bytes(7) + b"\xff\xd9"  # a libjpeg warning, not an error
    cmyk = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(flower[50:80, 50:90])).convert("CMYK").save(cmyk, format="JPEG", quality=85)
    out["flower_cmyk_adobe_30x40"] = cmyk.getvalue()
    plain = bytearray(cmyk.getvalue())
    plain[plain.find(b"Adobe")] = ord("X")  # no Adobe marker: TF reads the CMYK values as not inverted
    out["flower_cmyk_plain_30x40"] = bytes(plain)
    return out


def windows(height: int, width: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Crop windows (top, left, height, width) inside the image, narrow so that the file stays small."""
    chosen = [(0, 0, height, width), (1, 1, height - 2, min(width - 2, 20))]
    for left in (16, 17, 32, 33):  # on and off the 16-pixel iMCU grid of subsampled files
        for w in (1, 2, 7, 8, 15):
            if left + w < width:
                chosen.append((int(rng.integers(0, height // 2)), left, height // 2, w))
    chosen += [(height - 3, width - 2, 3, 2), (0, width - 9, height, 9), (0, 0, 1, 1)]
    for _ in range(6):
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        chosen.append((top, left, int(rng.integers(1, height - top + 1)), int(rng.integers(1, min(12, width - left) + 1))))
    return [w for w in dict.fromkeys(chosen)
            if min(w) >= 0 and w[2] > 0 and w[3] > 0 and w[0] + w[2] <= height and w[1] + w[3] <= width]


def main() -> None:
    rng = np.random.default_rng(0)
    record: dict[str, np.ndarray] = {}
    for name, data in files().items():
        full = tf.io.decode_jpeg(data, channels=3).numpy()
        record[f"{name}/jpeg"] = np.frombuffer(data, np.uint8)
        record[f"{name}/full"] = full
        boxes = windows(*full.shape[:2], rng)
        record[f"{name}/windows"] = np.array(boxes, np.int32)
        deltas = []
        for top, left, height, width in boxes:
            crop = tf.io.decode_and_crop_jpeg(data, [top, left, height, width], channels=3).numpy()
            # stored as the difference from the cut full decode: zero but for the columns the cropped decode
            # upsamples differently, so the file stays small
            deltas.append((crop.astype(np.int16) - full[top : top + height, left : left + width]).ravel())
        record[f"{name}/crop_minus_cut"] = np.concatenate(deltas)  # window after window, [h, w, 3] each
    np.savez_compressed(OUT, **record)
    print(f"{OUT}: {OUT.stat().st_size / 1024:.0f} KiB, {len(files())} files, "
          f"{sum(len(record[k]) for k in record if k.endswith('/windows'))} crops")


if __name__ == "__main__":
    main()
