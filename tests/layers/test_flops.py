"""``FlopCounterMode`` counts perceivers' models in full: oneDNN's linear and SDPA's CPU kernel have formulas
(``layers/flops.py``), and the models run under ``torch.no_grad()`` with it (``layers/broadcast.py``)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import perceivers
from perceivers import flash_perceiver, krasserm
from perceivers.io import BasicDecoder, PerceiverEncoder, PerceiverIOModel, TrainableQueries
from perceivers.layers import Linear, grid_attention, onednn_attention, use_onednn
from perceivers.layers.attention import attend_heads
from perceivers.layers.broadcast import per_sample

onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def _count(fn, *, grad: bool = True) -> int:
    with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@onednn
@pytest.mark.parametrize("enabled", [True, False])
def test_linear_counts_its_three_products(enabled):
    layer = Linear(512, 384)
    x = torch.randn(300, 512, requires_grad=True)  # 59M multiply-adds: above oneDNN's threshold
    with use_onednn(enabled):
        out = layer(x)
        assert ("OneDNN" in type(out.grad_fn).__name__) == enabled
        count = _count(lambda: layer(x).sum().backward())
    assert count == 3 * 2 * 300 * 512 * 384  # forward, input gradient, weight gradient


def test_cpu_flash_attention_counts_what_the_products_would():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 32, generator=g, requires_grad=True) for n in (16, 24, 24))
    pairs, d = 2 * 4 * 16 * 24, 32

    def written_out():
        return torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1) @ v

    assert _count(lambda: F.scaled_dot_product_attention(q, k, v)) == _count(written_out) == 2 * pairs * 2 * d
    # the model's FLOPs: its backward (which recomputes the scores) counts as the written-out backward's four
    # products, so %-of-matmul compares it with explicit attention like for like
    fused = _count(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    plain = _count(lambda: written_out().sum().backward())
    assert fused == plain == 3 * 2 * pairs * 2 * d


def test_attention_backward_counts_twice_the_forward_with_unequal_widths():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, n, 16, generator=g, requires_grad=True) for n in (8, 12))
    v = torch.randn(1, 2, 12, 40, generator=g, requires_grad=True)
    forward = _count(lambda: F.scaled_dot_product_attention(q, k, v))
    step = _count(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert forward == 2 * (2 * 8 * 12) * (16 + 40) and step == 3 * forward


@onednn
def test_onednn_attention_gives_way_under_a_counter():
    """Wide float32 heads run on oneDNN, whose backward recomputes the scores in products a counter sees: a
    counted training step came out 7/6 of the model's FLOPs (3758 M against 3221 M here). Under a counter they
    now go to SDPA, counted as the model's backward (twice the forward)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, n, 128, generator=g, requires_grad=True) for n in (256, 512, 512))
    with use_onednn(True):  # the default on AMD processors only
        assert onednn_attention.applies(q, k, v, None, 0.0)  # outside a counter: the oneDNN path
        forward = 2 * (2 * 8 * 256 * 512) * (128 + 128)
        assert _count(lambda: attend_heads(q, k, v, None, 0.0).sum().backward()) == 3 * forward
        assert _count(lambda: attend_heads(q, k, v, None, 0.0), grad=False) == forward


def test_per_sample_is_a_view_detached_only_without_autograd():
    p = torch.nn.Parameter(torch.randn(3, 4))
    out = per_sample(p, 5)
    assert out.shape == (5, 3, 4) and out.data_ptr() == p.data_ptr() and out.grad_fn is not None
    with torch.no_grad():
        out = per_sample(p, 5)
    assert out.shape == (5, 3, 4) and out.data_ptr() == p.data_ptr() and not out.requires_grad


def _perceiver():
    model = perceivers.Perceiver(input_channels=3, input_axis=2, num_freq_bands=4, max_freq=8.0, depth=2,
                                 num_latents=128, latent_dim=256, num_classes=10)
    return model, (torch.randn(2, 16, 16, 3),)


def _perceiver_io():
    model = perceivers.PerceiverIO(dim=32, queries_dim=24, logits_dim=7, depth=2, num_latents=128, latent_dim=256)
    return model, (torch.randn(2, 50, 32),), {"queries": torch.randn(9, 24)}


def _language():
    model = perceivers.PerceiverLM(num_tokens=40, dim=32, depth=1, max_seq_len=64, num_latents=128, latent_dim=256)
    return model, (torch.randint(0, 40, (2, 30)),)


def _io_model():
    encoder = PerceiverEncoder(16, num_latents=128, latent_channels=256, num_blocks=1, num_self_attends_per_block=1)
    decoder = BasicDecoder(TrainableQueries(10, 32), latent_channels=256, output_channels=5)
    return PerceiverIOModel(encoder, decoder), (torch.randn(2, 40, 16),)


def _flash():
    model = flash_perceiver.Perceiver(input_dim=6, depth=2, num_latents=128, latent_dim=256, output_dim=3)
    return model, (torch.randn(2, 40, 6),)


def _krasserm_image():
    config = krasserm.ImageClassifierConfig(
        encoder=krasserm.ImageEncoderConfig(image_shape=(8, 8, 3), num_frequency_bands=6, num_cross_attention_heads=1,
                                            num_self_attention_layers_per_block=1),
        decoder=krasserm.ClassificationDecoderConfig(num_classes=5, num_output_query_channels=32),
        num_latents=128, num_latent_channels=256)
    return krasserm.ImageClassifier(config), (torch.randn(2, 8, 8, 3),)


def _registry(name, make):
    return lambda: (perceivers.create_model(name, tiny=True), make())


BUILDS = {
    "perceiver": _perceiver, "perceiver_io": _perceiver_io, "language": _language, "io_model": _io_model,
    "flash_perceiver": _flash, "krasserm_image": _krasserm_image,
    "vision-perceiver-fourier": _registry("vision-perceiver-fourier", lambda: (torch.randn(2, 3, 16, 16),)),
    "language-perceiver": _registry("language-perceiver", lambda: (torch.randint(0, 262, (2, 16)),)),
}


@onednn
@pytest.mark.parametrize("name", list(BUILDS))
def test_models_count_the_same_with_or_without_autograd_and_onednn(name):
    """PyTorch's module tracker fails on a module input that is a view of a parameter under ``no_grad``
    (the learned latents or queries for every sample), so these models crashed a counter there; and oneDNN's
    products were counted as nothing."""
    torch.manual_seed(0)
    model, args, *kwargs = BUILDS[name]()
    model.eval()
    kwargs = kwargs[0] if kwargs else {}
    run = lambda: model(*args, **kwargs)
    with use_onednn(True):
        counts = {grad: _count(run, grad=grad) for grad in (True, False)}
    with use_onednn(False):
        plain = _count(run, grad=False)
    assert counts[True] == counts[False] == plain > 0


def test_grid_kernel_gives_way_under_a_counter(monkeypatch):
    """The native grid kernel (images with Fourier features) is not an operator: under a counter, as under fake
    tensors, the cross-attention runs through PyTorch's operators and is counted (it was left out)."""
    if not grid_attention.available():
        pytest.skip("the native kernels are not built here")
    model = perceivers.Perceiver(input_channels=3, input_axis=2, num_freq_bands=6, max_freq=10.0, depth=1,
                                 num_latents=16, latent_dim=32, num_classes=4).eval()
    image = torch.randn(1, 64, 64, 3)
    assert grid_attention.serves(image, masked=False, pixels=64 * 64)  # outside the counter: the kernel
    counted = _count(lambda: model(image), grad=False)
    monkeypatch.setattr(grid_attention, "available", lambda: False)
    assert _count(lambda: model(image), grad=False) == counted > 0
