"""Optical-flow helpers: official tiling and blending, 3×3 patches, normalisation, colour rendering."""

import numpy as np
import pytest
import torch

from perceivers.data import flow_model_fn, flow_to_color, normalize_frames, save_flow_png, tile_flow
from perceivers.data.flow import tile_origins, tile_weights


def test_sintel_size_gives_six_flush_tiles():
    origins = tile_origins((436, 1024))
    assert origins == [(0, 0), (0, 476), (0, 528), (68, 0), (68, 476), (68, 528)]
    assert tile_origins((368, 496)) == [(0, 0)]


def test_tiles_past_the_border_are_dropped():
    # colab: ys = [0, 4, 3] and xs = [0, 6, 5]; the tiles at 4 and 6 would run past the border
    assert tile_origins((9, 13), (6, 8), 2) == [(0, 0), (0, 5), (3, 0), (3, 5)]


@pytest.mark.parametrize("overlap", [-1, 6])
def test_overlap_outside_the_tile_is_refused(overlap):
    """A negative overlap leaves gaps between the tiles (their flow came out NaN), one as large as a tile never
    advances."""
    with pytest.raises(ValueError, match=rf"min_overlap={overlap} must be in \[0, 6\)"):
        tile_origins((9, 13), (6, 8), overlap)


def test_tile_weights_formula():
    w = tile_weights(4, 5)
    assert w.tolist() == [[1, 1, 1, 1, 1], [1, 2, 2, 2, 1], [1, 2, 2, 2, 1], [1, 1, 1, 1, 1]]


def test_normalize_frames():
    x = normalize_frames(np.array([0, 255, 127.5]))
    assert torch.allclose(x, torch.tensor([-1.0, 1.0, 0.0]))


def _frames(h, w, b=None, seed=0):
    g = np.random.default_rng(seed)
    shape = (h, w, 3) if b is None else (b, h, w, 3)
    return g.integers(0, 256, size=shape).astype(np.uint8), g.integers(0, 256, size=shape).astype(np.uint8)


def _pixelwise_model(frames):
    """A fake flow model whose output at a pixel depends only on that pixel: blending must return it unchanged."""
    return torch.stack((frames[:, 0, ..., 0] * 3.0, frames[:, 1, ..., 2] - frames[:, 0, ..., 1]), dim=-1)


@pytest.mark.parametrize("size", [(20, 30), (8, 12), (9, 40), (5, 7)])
def test_tile_flow_pixelwise_model_is_exact(size):
    f1, f2 = _frames(*size)
    got = tile_flow(_pixelwise_model, f1, f2, tile_size=(8, 12), min_overlap=2)
    pair = torch.stack((normalize_frames(f1), normalize_frames(f2)))[None]
    want = _pixelwise_model(pair)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def _reference_tiling(model_fn, f1, f2, tile, overlap):
    """The colab's algorithm written out in numpy, tile by tile."""
    pair = np.stack([f1, f2]).astype(np.float32)[None] / 255 * 2 - 1
    h, w = f1.shape[:2]
    ys = list(range(0, h, tile[0] - overlap))
    xs = list(range(0, w, tile[1] - overlap))
    ys[-1], xs[-1] = h - tile[0], w - tile[1]
    flows = np.zeros((1, h, w, 2), np.float64)
    count = np.zeros((1, h, w, 1), np.float64)
    wx, wy = np.meshgrid(np.arange(tile[1]), np.arange(tile[0]))
    weights = np.minimum(np.minimum(wx + 1, tile[1] - wx), np.minimum(wy + 1, tile[0] - wy))[None, :, :, None]
    for y in ys:
        for x in xs:
            out = model_fn(torch.from_numpy(pair[:, :, y : y + tile[0], x : x + tile[1]])).detach().numpy()
            flows[:, y : y + tile[0], x : x + tile[1]] += out * weights
            count[:, y : y + tile[0], x : x + tile[1]] += weights
    return flows[0] / count[0]


def _position_model(frames):
    """Output depends on the position inside the tile, so overlapping tiles disagree and blending matters."""
    _, _, h, w, _ = frames.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack((xx + frames[:, 0, ..., 0], yy * frames[:, 1, ..., 1]), dim=-1)


@pytest.mark.parametrize("tiles_per_batch", [1, 4])
def test_tile_flow_matches_colab_algorithm(tiles_per_batch):
    f1, f2 = _frames(23, 41, seed=4)
    got = tile_flow(_position_model, f1, f2, tile_size=(8, 12), min_overlap=3, tiles_per_batch=tiles_per_batch)
    want = _reference_tiling(_position_model, f1, f2, (8, 12), 3)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_tile_flow_batched_frames():
    f1, f2 = _frames(17, 26, b=2, seed=6)
    got = tile_flow(_position_model, f1, f2, tile_size=(8, 12), min_overlap=2, tiles_per_batch=3)
    for i in range(2):
        single = tile_flow(_position_model, f1[i], f2[i], tile_size=(8, 12), min_overlap=2)
        torch.testing.assert_close(got[i], single)


def test_tile_flow_checks_model_output():
    f1, f2 = _frames(8, 12)
    with pytest.raises(ValueError, match="model_fn must return"):
        tile_flow(lambda x: x[:, 0, ..., :1], f1, f2, tile_size=(8, 12), min_overlap=2)


def test_flow_to_color_directions(tmp_path):
    flow = np.zeros((3, 3, 2), np.float32)
    flow[0, 0] = (1, 0)  # right -> red
    flow[0, 1] = (-1, 0)  # left -> cyan
    flow[0, 2] = (0, 1)  # down
    flow[2, 2] = (np.nan, 0)
    rgb = flow_to_color(flow)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 3, 3)
    assert rgb[1, 1].tolist() == [255, 255, 255]  # zero flow is white
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[0, 1][0] == 0 and rgb[0, 1][1] > 200 and rgb[0, 1][2] > 200
    assert rgb[2, 2].tolist() == [0, 0, 0]
    half = flow_to_color(flow * 0.5, max_magnitude=1.0)
    assert half[0, 0].tolist() == [255, 127, 127]  # half saturation
    save_flow_png(flow, tmp_path / "f.png")
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "f.png")), rgb)


def test_tile_flow_with_a_tiny_flow_model():
    """A real (tiny, random) optical-flow Perceiver through flow_model_fn: one tile equals a direct call,
    several tiles blend the direct calls on each tile."""
    from perceivers.tasks import create_model

    model = create_model("optical-flow-perceiver", tiny=True).eval()  # train_size (6, 8)
    f1, f2 = _frames(6, 8, seed=7)
    fn = flow_model_fn(model)
    pair = torch.stack((normalize_frames(f1), normalize_frames(f2)))[None]
    with torch.no_grad():
        direct = model(pair.permute(0, 1, 4, 2, 3)).flow[0]
    torch.testing.assert_close(tile_flow(fn, f1, f2, tile_size=(6, 8), min_overlap=2), direct)
    torch.testing.assert_close(direct, model(pair.permute(0, 1, 4, 2, 3)).logits[0] * 20)
    g1, g2 = _frames(10, 14, seed=8)
    got = tile_flow(fn, g1, g2, tile_size=(6, 8), min_overlap=2)
    want = _reference_tiling(fn, g1, g2, (6, 8), 2)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_tile_flow_input_errors_name_what_was_expected():
    """normalized=True took uint8 frames and fed 0..255 to the model as if normalised; empty frames failed in
    F.pad; lists failed with AttributeError."""
    model = lambda x: torch.zeros(x.shape[0], x.shape[2], x.shape[3], 2)
    frame = np.zeros((8, 12, 3), np.uint8)
    with pytest.raises(TypeError, match="normalized=True takes floating-point frames in \\[-1, 1\\], got dtype"):
        tile_flow(model, frame, frame, tile_size=(4, 6), min_overlap=1, normalized=True)
    with pytest.raises(ValueError, match=r"frames are empty: shape \(0, 12, 3\)"):
        tile_flow(model, frame[:0], frame[:0], tile_size=(4, 6), min_overlap=1)
    as_list = frame.tolist()
    assert tile_flow(model, as_list, as_list, tile_size=(4, 6), min_overlap=1).shape == (8, 12, 2)
