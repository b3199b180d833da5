"""JPEG decoding that gives TensorFlow's pixels: ``tf.io.decode_jpeg`` / ``decode_and_crop_jpeg`` (``channels=3``).

DeepMind's ImageNet pipeline decodes with TensorFlow's defaults: libjpeg-turbo's fast integer inverse DCT
(``dct_method=""`` → ``JDCT_IFAST``) and "fancy" (triangular) chroma upsampling. Pillow decodes with the accurate
integer DCT (``JDCT_ISLOW``), 0.9–1.3 levels off on average and up to 16 on sharp edges. :func:`decode_jpeg`
decodes through `simplejpeg <https://pypi.org/project/simplejpeg/>`_ (libjpeg-turbo, ``fastdct=True``) and is
equal to TensorFlow's output byte for byte (``tests/data/test_jpeg_tf_parity.py``).

A cropped decode is *not* a full decode cut to the window: TF hands the window to libjpeg-turbo
(``jpeg_crop_scanline``), which decodes the columns from the window's left edge rounded down to a whole
iMCU (``8 · max h-sampling`` pixels) to its right edge, and upsamples the chroma of that strip as if it were the
whole image — the strip's first and last columns take their own chroma sample instead of blending it with the
neighbour outside. With horizontally subsampled chroma (4:2:0, 4:2:2) that changes the crop's last column
(when the strip's width is even) and its first (when the window starts on an iMCU boundary): by 10–20 levels
on photographs, up to 80 at sharp colour edges. :func:`decode_jpeg` decodes
the whole image and recomputes those columns from the chroma samples with libjpeg's integer upsampling and
YCbCr → RGB arithmetic. CMYK/YCCK files are converted to RGB as TF does (``k · c / 255`` with an Adobe marker,
``(255 − k)(255 − c) / 255`` without). EXIF orientation is ignored, as TF ignores it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["JpegInfo", "decode_jpeg", "have_tf_decoder", "is_jpeg", "jpeg_info"]

# start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic), not DHT/JPG/DAC
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS, _APP0, _APP14 = 0xDA, 0xE0, 0xEE


def is_jpeg(data: bytes) -> bool:
    """Whether ``data`` starts like a JPEG file (SOI marker and a marker after it)."""
    return len(data) > 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF


@lru_cache(maxsize=1)
def have_tf_decoder() -> bool:
    """Whether :func:`decode_jpeg` can run (``simplejpeg`` is installed)."""
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class JpegInfo:
    """What the frame header says: size, per-component sampling factors ``(h, v)``, markers met before the scan.

    Attributes:
        jfif: whether there is a JFIF APP0 segment.
        adobe_transform: the (last) Adobe APP14 colour transform (0 none, 1 YCbCr, 2 YCCK), None without one.
        colour_segments: byte offsets of the JFIF and Adobe segments (the markers that say the colour space).
    """

    height: int
    width: int
    sampling: tuple[tuple[int, int], ...]
    jfif: bool
    adobe_transform: int | None
    colour_segments: tuple[int, ...]

    @property
    def components(self) -> int:
        return len(self.sampling)

    @property
    def is_ycbcr(self) -> bool:
        """Three components stored as YCbCr, libjpeg's rule: JFIF, or an Adobe transform of 1, or neither marker
        and component ids other than 'R', 'G', 'B' (the last case is taken as YCbCr here)."""
        if self.components != 3:
            return False
        return self.jfif or self.adobe_transform in (None, 1)


def jpeg_info(data: bytes) -> JpegInfo:
    """Parse the segments before the first scan: ``ValueError`` if ``data`` is no JPEG or has no frame header."""
    if not is_jpeg(data):
        raise ValueError("not a JPEG file (no SOI marker)")
    at, size = 2, len(data)
    frame = adobe = None
    jfif, marked = False, []
    while at + 4 <= size:
        if data[at] != 0xFF:
            raise ValueError(f"corrupt JPEG: expected a marker at byte {at}")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = struct.unpack_from(">H", data, at + 2)[0]
        body = data[at + 4 : at + 2 + length]
        if marker in _SOF_MARKERS and frame is None:
            if len(body) < 6:
                raise ValueError("corrupt JPEG: short frame header")
            height, width, count = struct.unpack_from(">HHB", body, 1)
            factors = tuple((body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(count))
            frame = (height, width, factors)
        elif marker == _APP0 and body[:5] == b"JFIF\0":
            jfif = True
            marked.append(at)
        elif marker == _APP14 and body[:5] == b"Adobe" and len(body) >= 12:
            adobe = body[11]
            marked.append(at)
        elif marker == _SOS:
            break
        at += 2 + length
    if frame is None:
        raise ValueError("corrupt JPEG: no frame header before the first scan")
    return JpegInfo(frame[0], frame[1], frame[2], jfif, adobe, tuple(marked))


def decode_jpeg(data: bytes, crop_window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """JPEG bytes → ``uint8 [H, W, 3]`` RGB, equal to TensorFlow's ``decode_jpeg(channels=3)``.

    Args:
        data: the file's bytes.
        crop_window: ``(top, left, height, width)``: the output of ``tf.io.decode_and_crop_jpeg(data,
            crop_window, channels=3)`` instead, ``uint8 [height, width, 3]`` (see the module notes for how it
            differs from cutting the full decode).

    Raises:
        ImportError: simplejpeg is not installed.
        ValueError: not a JPEG, corrupt data, or a crop window outside the image.
    """
    if not have_tf_decoder():
        raise ImportError("decode_jpeg needs simplejpeg (pip install simplejpeg, or the 'train' extra)")
    info = jpeg_info(data)
    height, width = info.height, info.width
    if crop_window is None:
        top, left, crop_h, crop_w = 0, 0, height, width
    else:
        top, left, crop_h, crop_w = (int(v) for v in crop_window)
        if crop_h <= 0 or crop_w <= 0 or top < 0 or left < 0 or top + crop_h > height or left + crop_w > width:
            raise ValueError(f"crop window (top, left, height, width) = {tuple(crop_window)} does not lie inside the "
                             f"{height}×{width} image with a positive size")
    if info.components == 4:  # CMYK or YCCK: libjpeg gives CMYK, TF converts it to RGB itself
        cmyk = _decode(data, "CMYK", fastupsample=False)
        return _cmyk_to_rgb(cmyk[top : top + crop_h, left : left + crop_w], info.adobe_transform is not None)
    rgb = _decode(data, "RGB", fastupsample=False)
    out = np.array(rgb[top : top + crop_h, left : left + crop_w])  # a writable copy
    if crop_window is not None and info.components == 3:
        _redo_strip_edges(out, data, info, top, left, crop_h, crop_w)
    return out


def _decode(data: bytes, colorspace: str, fastupsample: bool) -> np.ndarray:
    """simplejpeg with TF's DCT; like TF, refuses truncated data but decodes through libjpeg's other warnings
    (e.g. "extraneous bytes before marker"), which simplejpeg's strict mode would refuse."""
    import simplejpeg

    try:
        return simplejpeg.decode_jpeg(data, colorspace, fastdct=True, fastupsample=fastupsample)
    except ValueError as e:
        if "premature end" in str(e).lower():
            raise ValueError(f"truncated JPEG ({e})") from e
        try:
            return simplejpeg.decode_jpeg(data, colorspace, fastdct=True, fastupsample=fastupsample, strict=False)
        except ValueError as e2:
            raise ValueError(f"corrupt JPEG ({e2})") from e2


def _cmyk_to_rgb(cmyk: np.ndarray, adobe: bool) -> np.ndarray:
    """TF's CMYK → RGB (integer division): Adobe files store inverted CMYK."""
    c, m, y, k = (cmyk[..., i].astype(np.int32) for i in range(4))
    if not adobe:
        c, m, y, k = 255 - c, 255 - m, 255 - y, 255 - k
    return np.stack([k * c // 255, k * m // 255, k * y // 255], axis=-1).astype(np.uint8)


def _redo_strip_edges(out: np.ndarray, data: bytes, info: JpegInfo, top: int, left: int, crop_h: int,
                      crop_w: int) -> None:
    """Recompute, in place, the crop's columns whose chroma libjpeg-turbo upsamples differently in a cropped decode.

    The decoded strip runs from ``x0`` (the window's left edge rounded down to an iMCU) to the window's right edge.
    Only chroma subsampled 2× horizontally is upsampled with neighbours (fancy upsampling); other layouts
    (4:4:4, 4:4:0, 4:1:1) replicate samples or need no upsampling, so a cropped decode equals the cut full decode.
    """
    max_h = max(h for h, _ in info.sampling)
    max_v = max(v for _, v in info.sampling)
    luma, *chroma = info.sampling
    if luma != (max_h, max_v) or len(set(chroma)) != 1 or chroma[0][0] * 2 != max_h:
        return  # not 4:2:0 / 4:2:2 with full-resolution luma
    vertical = max_v // chroma[0][1]  # 1: 4:2:2, 2: 4:2:0
    if vertical * chroma[0][1] != max_v or vertical > 2 or -(-info.width // 2) <= 2:
        return  # other vertical factors; or chroma too narrow for fancy upsampling (libjpeg then replicates)
    align = 8 * max_h
    x0 = left // align * align
    strip = left + crop_w - x0
    samples = -(-strip // 2)  # chroma samples across the strip
    columns = []  # strip positions to recompute
    if x0 == left and left > 0:
        columns.append(0)
    if left + crop_w < info.width and (strip % 2 == 0 or samples == 1):
        columns.append(strip - 1)
    if samples == 1:  # libjpeg-turbo falls back to replication for a one-sample strip
        columns = list(range(strip))
    columns = [p for p in dict.fromkeys(columns) if p >= left - x0]
    if not columns:
        return
    planes = _decode(_as_untransformed(data, info), "RGB", fastupsample=True)  # [H, W, (Y, Cb, Cr)], chroma boxed
    samples_of = [planes[::vertical, ::2, channel] for channel in (1, 2)]  # [ceil(H / vertical), ceil(W / 2)]
    rows = np.arange(top, top + crop_h)
    for p in columns:
        y = planes[top : top + crop_h, x0 + p, 0].astype(np.int64)
        cb, cr = (_edge_chroma(plane, rows, x0 // 2, samples, p, vertical) for plane in samples_of)
        out[:, x0 + p - left] = _ycc_to_rgb(y, cb, cr) if info.is_ycbcr else np.stack([y, cb, cr], -1)


def _as_untransformed(data: bytes, info: JpegInfo) -> bytes:
    """The same file marked as stored without colour transform (its JFIF/Adobe segments renamed, an Adobe APP14
    with transform 0 first), so that libjpeg outputs the components themselves: luma and the two chroma planes."""
    body = bytearray(data)
    for at in info.colour_segments:
        body[at + 4] = ord("X")  # "XFIF" / "Xdobe": same length, no longer read
    adobe = b"\xff\xee" + struct.pack(">H5sHHHB", 14, b"Adobe", 100, 0, 0, 0)
    return bytes(body[:2]) + adobe + bytes(body[2:])


def _edge_chroma(plane: np.ndarray, rows: np.ndarray, first: int, samples: int, p: int, vertical: int) -> np.ndarray:
    """libjpeg's upsampled chroma at strip column ``p`` for image ``rows``, treating the strip's chroma samples
    ``plane[:, first : first + samples]`` as the whole image width (2x horizontally; 2x vertically when
    ``vertical`` is 2, blending with the full image's neighbour rows)."""
    i, odd = divmod(p, 2)
    col = first + i
    if samples == 1:
        return plane[rows // vertical, col].astype(np.int64)
    if vertical == 1:
        here = plane[rows, col].astype(np.int64)
        if odd:
            return here if i == samples - 1 else (3 * here + plane[rows, col + 1] + 2) >> 2
        return here if i == 0 else (3 * here + plane[rows, col - 1] + 1) >> 2
    near = rows // 2  # the chroma row of each image row, and the one it blends with (the edge row repeats)
    far = np.clip(np.where(rows % 2 == 0, near - 1, near + 1), 0, plane.shape[0] - 1)

    def colsum(c: int) -> np.ndarray:
        return 3 * plane[near, c].astype(np.int64) + plane[far, c]

    here = colsum(col)
    if odd:
        return (4 * here + 7) >> 4 if i == samples - 1 else (3 * here + colsum(col + 1) + 7) >> 4
    return (4 * here + 8) >> 4 if i == 0 else (3 * here + colsum(col - 1) + 8) >> 4


# libjpeg's YCbCr -> RGB in 16-bit fixed point (JFIF coefficients, each product rounded once)
_ONE_HALF = 1 << 15


def _fix(v: float) -> int:
    return int(v * 65536 + 0.5)


_CHROMA = np.arange(256, dtype=np.int64) - 128
_CR_R = (_fix(1.40200) * _CHROMA + _ONE_HALF) >> 16
_CB_B = (_fix(1.77200) * _CHROMA + _ONE_HALF) >> 16
_CR_G = -_fix(0.71414) * _CHROMA
_CB_G = -_fix(0.34414) * _CHROMA + _ONE_HALF


def _ycc_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    """Integer levels ``[n]`` → ``uint8 [n, 3]`` as libjpeg converts them."""
    rgb = np.stack([y + _CR_R[cr], y + ((_CB_G[cb] + _CR_G[cr]) >> 16), y + _CB_B[cb]], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)
