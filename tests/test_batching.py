import torch

from perceivers import Perceiver
from perceivers.batching import pad_grid_batch, pad_point_batch


def _model():
    torch.manual_seed(0)
    return Perceiver(num_freq_bands=4, depth=2, max_freq=10.0, input_channels=3, input_axis=2,
                     num_latents=8, latent_dim=16, num_classes=5, latent_heads=2, latent_dim_head=8,
                     cross_dim_head=8).eval()


def test_ragged_images_match_single_sample_runs():
    model = _model()
    images = [torch.randn(6, 9, 3), torch.randn(4, 4, 3), torch.randn(7, 5, 3)]
    data, pos, mask = pad_grid_batch(images)
    assert data.shape == (3, 54, 3) and mask.sum().item() == 54 + 16 + 35
    batched = model(data, mask=mask, pos=pos)
    for i, img in enumerate(images):
        alone = model(img[None])
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=0)


def test_point_cloud_coordinates():
    model = Perceiver(num_freq_bands=4, depth=1, max_freq=10.0, input_channels=2, input_axis=3,
                      num_latents=8, latent_dim=16, num_classes=4, latent_heads=2, latent_dim_head=8,
                      cross_dim_head=8).eval()
    clouds = [torch.randn(11, 2), torch.randn(5, 2)]
    xyz = [torch.rand(11, 3) * 2 - 1, torch.rand(5, 3) * 2 - 1]
    data, pos, mask = pad_point_batch(clouds, xyz)
    out = model(data, mask=mask, pos=pos)
    alone = model(clouds[1][None], pos=xyz[1][None])
    torch.testing.assert_close(out[1], alone[0], atol=1e-5, rtol=0)
    # a point cloud is a set: permuting points and their coordinates together changes nothing
    perm = torch.randperm(11)
    torch.testing.assert_close(model(clouds[0][perm][None], pos=xyz[0][perm][None])[0], out[0], atol=1e-5, rtol=0)


def test_ragged_images_in_float64_match_single_sample_runs():
    """A float64 model takes the padded batch too (the grid coordinates were float32 and refused), to float64
    rounding; bfloat16 samples give a bfloat16 batch."""
    model = _model().double()
    images = [torch.randn(6, 9, 3, dtype=torch.float64), torch.randn(4, 4, 3, dtype=torch.float64)]
    data, pos, mask = pad_grid_batch(images)
    assert data.dtype == pos.dtype == torch.float64
    batched = model(data, mask=mask, pos=pos)
    for i, img in enumerate(images):
        torch.testing.assert_close(batched[i], model(img[None])[0], atol=1e-12, rtol=0)
    data, pos, _ = pad_grid_batch([img.bfloat16() for img in images])
    assert data.dtype == pos.dtype == torch.bfloat16


def test_point_coordinates_of_another_float_dtype_are_cast():
    data, pos, _ = pad_point_batch([torch.randn(3, 2, dtype=torch.float64)], [torch.rand(3, 3)])
    assert data.dtype == pos.dtype == torch.float64
