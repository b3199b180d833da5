"""The native GEGLU, tanh-GELU and softmax kernels: values and gradients against float64, where they are taken, and
the layers that go through them."""

import math

import pytest
import torch
import torch.nn.functional as F

from perceivers import kernels
from perceivers.layers import FeedForward, dense
from perceivers.layers import native_activation as na

pytestmark = pytest.mark.skipif(not na.available(), reason="no C compiler: the native kernels are not built")


def _sample(seed, shape, scale, grad_shape=None, dtype=torch.float32):
    """An input ``[shape] · scale`` requiring grad and an output gradient (``grad_shape``, default ``shape``), in
    ``dtype``, from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * scale).to(dtype).requires_grad_()
    return x, torch.randn(grad_shape or shape, generator=generator).to(dtype)


def _reference(h, grad):
    """``a · gelu(g)`` and the gradient of ``h`` in float64."""
    hd = h.detach().double().requires_grad_()
    value, gate = hd.chunk(2, dim=-1)
    out = value * F.gelu(gate)
    out.backward(grad.double())
    return out, hd.grad


def _torch_float32(h, grad):
    """PyTorch's own float32 GEGLU: value and the gradient of ``h``."""
    h = h.detach().requires_grad_()
    value, gate = h.chunk(2, dim=-1)
    out = value * F.gelu(gate)
    out.backward(grad)
    return out, h.grad


@pytest.mark.parametrize("shape", [
    (8, 256, 4096),  # the README Perceiver's latent feed-forward
    (3, 37, 2 * 19),  # rows narrower than a vector, a partial last vector
    (5, 2 * 40),      # two full vectors and a partial one per half
    (1, 2),
])
@pytest.mark.parametrize("scale", [1.0, 6.0])  # 6: far tails of the GELU (exp underflows below g ≈ -13)
def test_values_and_gradients_match_float64(shape, scale):
    h, grad = _sample(0, shape, scale, (*shape[:-1], shape[-1] // 2))
    assert na.applies(h)
    out = na.geglu(h)
    out.backward(grad)
    ref_out, ref_grad = _reference(h, grad)
    torch_out, torch_grad = _torch_float32(h, grad)
    for got, ref, theirs in ((out, ref_out, torch_out), (h.grad, ref_grad, torch_grad)):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        error = (got.double() - ref).abs().max().item()
        # as close to float64 as PyTorch's float32 path, to within 3e-7 of the largest entry
        assert error <= max(1.5 * (theirs.double() - ref).abs().max().item(), 3e-7 * ref.abs().max().item())


@pytest.mark.parametrize("shape", [(8, 256, 4096), (3, 37, 2 * 19), (5, 2 * 40), (1, 2)])
@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_bfloat16_is_computed_in_float32_and_rounded_once(shape, scale):
    """bfloat16 rows: the value is float64's GEGLU of the same bfloat16 inputs rounded once to bfloat16 (to within a
    float32 rounding that may tip a tie, and gates below -13.2 giving 0 (``activations.c``): at most 1% of
    entries one bfloat16 step off), and the gradient is no
    further from float64 than PyTorch's bfloat16 path, which rounds after every operation."""
    h, grad = _sample(1, shape, scale, (*shape[:-1], shape[-1] // 2), torch.bfloat16)
    assert na.applies(h)
    out = na.geglu(h)
    out.backward(grad)
    assert out.dtype == h.grad.dtype == torch.bfloat16
    ref_grad = _reference(h, grad)[1]
    value, gate = h.detach().double().chunk(2, dim=-1)
    rounded = (value * gate * 0.5 * torch.special.erfc(-gate / math.sqrt(2))).bfloat16()  # exact far into the tail
    off = out != rounded
    assert off.float().mean() <= 0.01
    step = (rounded.double().abs() * 2.0 ** -7).clamp_min(1e-35)  # the kernel's exp is 0 below e^-87 (gates < -13.2)
    assert ((out.double() - rounded.double()).abs()[off] <= step[off] * 1.001).all()
    theirs = _torch_float32(h, grad)[1]  # the same operations, in bfloat16
    error = (h.grad.double() - ref_grad).abs().max().item()
    assert error <= max((theirs.double() - ref_grad).abs().max().item(), 2.0 ** -8 * ref_grad.abs().max().item())


def test_bfloat16_keeps_nan_and_infinity():
    h = torch.tensor([[float("nan"), 1.0, float("inf"), -2.0, 0.5, float("nan"), 3.0, float("inf")]]).bfloat16()
    out = na.geglu(h)
    expected = h[:, :4].double() * F.gelu(h[:, 4:].double())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected.bfloat16().double(), equal_nan=True)


def _gelu_tanh_reference(x, grad):
    """The tanh GELU of ``x`` and its gradient in float64, written ``x σ(2u)`` (equal to ``0.5 x (1 + tanh u)``, which
    cancels to 0 in float64's tail too)."""
    xd = x.detach().double().requires_grad_()
    out = xd * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3))
    out.backward(grad.double())
    return out, xd.grad


@pytest.mark.parametrize("shape", [(8, 256, 512), (3, 37, 19), (4097,), (1,)])  # blocks of 4096, partial vectors
@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_gelu_tanh_values_and_gradients_match_float64(shape, scale):
    """As close to float64 as PyTorch's float32 ``gelu(approximate="tanh")``, to within 3e-7 of the largest
    entry; the kernel's own error is a few float32 roundings."""
    x, grad = _sample(2, shape, scale)
    assert na.applies(x, "gelu_tanh")
    out = na.gelu_tanh(x)
    out.backward(grad)
    ref_out, ref_grad = _gelu_tanh_reference(x, grad)
    xt = x.detach().requires_grad_()
    torch_out = F.gelu(xt, approximate="tanh")
    torch_out.backward(grad)
    for got, ref, theirs in ((out, ref_out, torch_out), (x.grad, ref_grad, xt.grad)):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        error = (got.double() - ref).abs().max().item()
        assert error <= max(1.5 * (theirs.double() - ref).abs().max().item(), 3e-7 * ref.abs().max().item())


def test_gelu_tanh_keeps_its_relative_accuracy_in_the_tail_and_its_limits():
    """Through the logistic function the value stays within 3e-5 relative to float64 down to x = -10 (u's rounding,
    magnified by exp(-2u) ≈ e^87 there; 3e-6 above x = -5), where PyTorch's
    ``0.5 x (1 + tanh u)`` is 0 below x ≈ -5.3); beyond ±10 the value is x or 0 and the derivative 1 or 0, where
    PyTorch's formula overflows to NaN (±inf, 1e20). NaN stays NaN."""
    x = torch.linspace(-10.0, 10.0, 20001).requires_grad_()
    out = na.gelu_tanh(x)
    out.sum().backward()
    ref_out, ref_grad = _gelu_tanh_reference(x, torch.ones_like(x))
    relative = (out.double() - ref_out).abs() / ref_out.abs().clamp_min(1e-300)
    assert relative.max().item() < 3e-5 and relative[x > -5].max().item() < 3e-6
    assert (x.grad.double() - ref_grad).abs().max().item() < 1e-6
    special = torch.tensor([float("-inf"), -1e20, -20.0, 20.0, 1e20, float("inf"), float("nan")], requires_grad=True)
    out = na.gelu_tanh(special)
    out.sum().backward()
    torch.testing.assert_close(out[:6], torch.tensor([0.0, 0.0, 0.0, 20.0, 1e20, float("inf")]))
    torch.testing.assert_close(special.grad[:6], torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
    assert out[6].isnan() and special.grad[6].isnan()


@pytest.mark.parametrize("shape", [(8, 256, 512), (3, 37, 19)])
@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_gelu_tanh_bfloat16_is_computed_in_float32_and_rounded_once(shape, scale):
    """bfloat16: float64's tanh GELU of the same inputs rounded once (at most 1% of entries one step off: float32
    roundings tipping a tie, and the tail below x = -5.3 where the float64 value is tiny); gradients no further
    from float64 than PyTorch's bfloat16 path."""
    x, grad = _sample(3, shape, scale, dtype=torch.bfloat16)
    out = na.gelu_tanh(x)
    out.backward(grad)
    assert out.dtype == x.grad.dtype == torch.bfloat16
    ref_out, ref_grad = _gelu_tanh_reference(x, grad)
    rounded = ref_out.bfloat16()
    off = out != rounded
    assert off.float().mean() <= 0.01
    step = (rounded.double().abs() * 2.0 ** -7).clamp_min(1e-35)
    assert ((out.double() - rounded.double()).abs()[off] <= step[off] * 1.001).all()
    xt = x.detach().requires_grad_()
    F.gelu(xt, approximate="tanh").backward(grad)
    error = (x.grad.double() - ref_grad).abs().max().item()
    assert error <= max((xt.grad.double() - ref_grad).abs().max().item(), 2.0 ** -8 * ref_grad.abs().max().item())


def test_gelu_tanh_second_order_gradients_and_strided_input():
    x = torch.randn(6, 40, requires_grad=True)
    first = torch.autograd.grad(na.gelu_tanh(x[:, ::2]).square().sum(), x, create_graph=True)[0]
    second = torch.autograd.grad(first.sum(), x)[0]
    xd = x.detach().double().requires_grad_()
    ref_first = torch.autograd.grad(F.gelu(xd[:, ::2], approximate="tanh").square().sum(), xd, create_graph=True)[0]
    ref_second = torch.autograd.grad(ref_first.sum(), xd)[0]
    torch.testing.assert_close(first.double(), ref_first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.double(), ref_second, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(16, 256, 2 * 512), (3, 37, 2 * 19), (5, 2 * 40), (1, 2)])
@pytest.mark.parametrize("scale", [1.0, 12.0])  # 12: sigmoids within float32's rounding of 0 and 1
def test_glu_values_and_gradients_match_float64(shape, scale):
    """GLU (``a · sigmoid(g)``, FlashPerceiver's MLPs): value and gradient as close to float64 as ``F.glu`` in float32
    (to within 3e-7 of the largest entry), and in bfloat16 the value float64's rounded once (at most 1% of entries a
    tie one step off) and the gradient no further from float64 than PyTorch's bfloat16 ``glu``."""
    h, grad = _sample(3, shape, scale, (*shape[:-1], shape[-1] // 2))
    assert na.applies(h, "glu")
    out = na.glu(h)
    out.backward(grad)
    hd = h.detach().double().requires_grad_()
    ref = F.glu(hd, -1)
    ref.backward(grad.double())
    hf = h.detach().requires_grad_()
    theirs = F.glu(hf, -1)
    theirs.backward(grad)
    for got, want, torch_f32 in ((out, ref, theirs), (h.grad, hd.grad, hf.grad)):
        error = (got.double() - want).abs().max().item()
        assert error <= max(1.5 * (torch_f32.double() - want).abs().max().item(), 3e-7 * want.abs().max().item())

    h16, grad16 = h.detach().bfloat16().requires_grad_(), grad.bfloat16()
    out16 = na.glu(h16)
    out16.backward(grad16)
    assert out16.dtype == h16.grad.dtype == torch.bfloat16
    exact = F.glu(h16.detach().double(), -1)
    off = out16 != exact.bfloat16()
    assert off.float().mean() <= 0.01
    assert ((out16.double() - exact).abs()[off] <= exact.abs()[off] * 2.0 ** -8 * 1.001).all()
    h16d = h16.detach().double().requires_grad_()
    F.glu(h16d, -1).backward(grad16.double())
    h16t = h16.detach().requires_grad_()
    F.glu(h16t, -1).backward(grad16)
    error = (h16.grad.double() - h16d.grad).abs().max().item()
    assert error <= max((h16t.grad.double() - h16d.grad).abs().max().item(), 2.0 ** -8 * h16d.grad.abs().max().item())


def test_glu_keeps_nan_infinity_and_its_tails():
    """``sigmoid(±inf)`` is 1 / 0 and NaN passes, and far in the tails the gate keeps its relative accuracy: from
    ``exp(-|g|)``, never overflowing (``sigmoid(-80) ≈ 1.8e-35``, where ``1 - sigmoid(80)`` in float32 is 0)."""
    g = torch.tensor([float("nan"), float("inf"), -float("inf"), -80.0, 80.0, -20.0, 20.0, 0.0])
    h = torch.cat([torch.full_like(g, 3.0), g])[None].requires_grad_()
    out = na.glu(h)
    ref = 3.0 * torch.sigmoid(g.double())
    torch.testing.assert_close(out[0].double(), ref, rtol=3e-7, atol=0, equal_nan=True)
    out.sum().backward()
    dg = h.grad[0, 8:].double()
    e = torch.exp(-g.double().abs())  # s (1 - s) = e / (1 + e)², exact in float64 where 1 - s(80) is 0 there too
    torch.testing.assert_close(dg[3:], (3.0 * e / (1 + e) ** 2)[3:], rtol=1e-6, atol=0)  # 5.4e-35 at ±80, not 0


@pytest.mark.parametrize("activation", ["geglu", "glu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(8, 256, 4096), (3, 37, 2 * 19), (5, 2 * 40), (1, 2)])
def test_bias_values_and_gradients_match_float64(activation, shape):
    """With the preceding product's bias (``takes_bias``), the kernels compute the activation of ``h + bias``: value
    and the gradients of ``h`` and of the bias (summed over the rows) as close to float64 as PyTorch's float32 path
    with the bias added first."""
    n_out = shape[-1] // 2 if activation in ("geglu", "glu") else shape[-1]
    h, grad = _sample(1, shape, 2.0, (*shape[:-1], n_out))
    bias = (torch.randn(shape[-1], generator=torch.Generator().manual_seed(2)) * 2).requires_grad_()
    out = getattr(na, activation)(h, bias)
    out.backward(grad)

    def path(dtype):
        hd, bd = (t.detach().to(dtype).requires_grad_() for t in (h, bias))
        z = hd + bd
        if activation == "geglu":
            value, gate = z.chunk(2, dim=-1)
            result = value * F.gelu(gate)
        elif activation == "glu":
            result = F.glu(z, -1)
        else:
            result = F.gelu(z, approximate="tanh")
        result.backward(grad.to(dtype))
        return result, hd.grad, bd.grad

    for got, ref, theirs in zip((out, h.grad, bias.grad), path(torch.float64), path(torch.float32)):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        error = (got.double() - ref).abs().max().item()
        assert error <= max(1.5 * (theirs.double() - ref).abs().max().item(), 3e-7 * ref.abs().max().item())


def test_bias_second_order_gradients():
    """``create_graph=True`` through the biased kernels: second-order gradients of ``h`` and the bias as float64's."""
    h = torch.randn(6, 2 * 24, requires_grad=True)
    bias = torch.randn(2 * 24, requires_grad=True)
    hd, bd = (t.detach().double().requires_grad_() for t in (h, bias))
    for fn, ref in ((na.geglu, lambda z: z.chunk(2, -1)[0] * F.gelu(z.chunk(2, -1)[1])),
                    (na.glu, lambda z: F.glu(z, -1)), (na.gelu_tanh, lambda z: F.gelu(z, approximate="tanh"))):
        first = torch.autograd.grad(fn(h, bias).square().sum(), (h, bias), create_graph=True)
        second = torch.autograd.grad(sum(g.sum() for g in first), (h, bias))
        ref_first = torch.autograd.grad(ref(hd + bd).square().sum(), (hd, bd), create_graph=True)
        ref_second = torch.autograd.grad(sum(g.sum() for g in ref_first), (hd, bd))
        for got, want in zip((*first, *second), (*ref_first, *ref_second)):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case, expected", [
    ("float32", True), ("no bias", False), ("autocast", False), ("bfloat16", False), ("empty", False),
])
def test_where_the_kernel_takes_the_bias(case, expected):
    """``takes_bias``: float32 operands outside autocast, with a bias, where the kernel runs."""
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    x = torch.randn(0 if case == "empty" else 4, 8, dtype=dtype)
    weight, bias = torch.randn(16, 8, dtype=dtype), None if case == "no bias" else torch.randn(16, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        assert na.takes_bias(x, weight, bias) is expected


@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_builds_for_narrower_vectors_match_float64(march, built_for):
    """Built for AVX2 (8-float vectors, masked tails) and for SSE2, the kernels pass the comparisons above."""
    built_for(march)
    for shape in ((3, 37, 2 * 19), (5, 2 * 40), (4, 2 * 1000)):
        for scale in (1.0, 6.0):
            test_values_and_gradients_match_float64(shape, scale)
            test_bfloat16_is_computed_in_float32_and_rounded_once(shape, scale)
            test_gelu_tanh_values_and_gradients_match_float64(shape, scale)
            test_gelu_tanh_bfloat16_is_computed_in_float32_and_rounded_once(shape, scale)
        for activation in ("geglu", "glu", "gelu_tanh"):
            test_bias_values_and_gradients_match_float64(activation, shape)
        for scale in (1.0, 12.0):
            test_glu_values_and_gradients_match_float64(shape, scale)
        test_glu_keeps_nan_infinity_and_its_tails()
        test_bfloat16_keeps_nan_and_infinity()
    for shape in _SOFTMAX_SHAPES:
        for scale in (1.0, 30.0):
            test_softmax_values_and_gradients_match_float64(shape, scale)
            test_softmax_bfloat16_is_computed_in_float32_and_rounded_once(shape, scale)
    for dtype in (torch.float32, torch.bfloat16):
        test_softmax_keeps_pytorchs_nan_and_infinity(dtype)
    test_gelu_tanh_keeps_its_relative_accuracy_in_the_tail_and_its_limits()
    assert march in " ".join(kernels._FLAGS) and kernels._loaded["activations"] is not None


def test_gelu_is_the_exact_one_with_its_relative_accuracy_in_the_tail():
    """The erf GELU (not the tanh one), within 1e-5 relative to float64 down to g = -13 (gelu(-13) ≈ -8e-38),
    where ``0.5 · (1 + erf)`` in float32 (PyTorch's form) loses every digit; the derivative likewise."""
    g = torch.linspace(-13.0, 13.0, 20001)
    h = torch.cat([torch.ones_like(g), g])[None].requires_grad_()  # a = 1: the output is gelu(g)
    out = na.geglu(h)
    out.sum().backward()
    gd = g.double()
    cdf = 0.5 * torch.special.erfc(-gd / math.sqrt(2))
    exact, slope = gd * cdf, cdf + gd * torch.exp(-0.5 * gd * gd) / math.sqrt(2 * math.pi)
    assert ((out[0].double() - exact).abs() / exact.abs().clamp_min(1e-300)).max().item() < 1e-5
    assert (out[0].double() - exact).abs().max().item() < 5e-7
    assert (h.grad[0, g.numel():].double() - slope).abs().max().item() < 5e-7
    assert (out[0].double() - F.gelu(g, approximate="tanh").double()).abs().max().item() > 1e-4


def test_strided_rows_and_gradient_layout():
    """Rows spaced out in memory (a slice of a wider tensor) are read in place; the gradient has ``h``'s shape."""
    base = torch.randn(6, 4, 100, requires_grad=True)
    h = base[..., :64]
    out = na.geglu(h)
    torch.testing.assert_close(out, h[..., :32] * F.gelu(h[..., 32:]))
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = torch.zeros(6, 4, 100, dtype=torch.float64)
    ref[..., :64] = _reference(h, grad)[1]
    torch.testing.assert_close(base.grad.double(), ref, rtol=1e-5, atol=1e-6)


def test_second_order_gradients_match_pytorch():
    h = torch.randn(3, 5, 48, dtype=torch.float32, requires_grad=True)
    first = torch.autograd.grad(na.geglu(h).square().sum(), h, create_graph=True)[0]
    second = torch.autograd.grad(first.sum(), h)[0]
    hd = h.detach().double().requires_grad_()
    value, gate = hd.chunk(2, dim=-1)
    ref_first = torch.autograd.grad((value * F.gelu(gate)).square().sum(), hd, create_graph=True)[0]
    ref_second = torch.autograd.grad(ref_first.sum(), hd)[0]
    torch.testing.assert_close(first.double(), ref_first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.double(), ref_second, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case, expected", [
    ("float32", True),
    ("odd width", False),
    ("empty", False),
    ("bfloat16", True),
    ("float64", False),
    ("disabled", False),
    ("FLOP counter", False),
    ("vmap", False),
    ("forward-mode AD", False),
    ("tensor subclass", False),
])
def test_where_it_applies(case, expected, monkeypatch):
    dtype = {"bfloat16": torch.bfloat16, "float64": torch.float64}.get(case, torch.float32)
    h = torch.randn({"odd width": (4, 33), "empty": (0, 32)}.get(case, (4, 32)), dtype=dtype)
    if case == "disabled":
        monkeypatch.setenv("PERCEIVERS_NATIVE", "0")
    if case == "tensor subclass":
        class Wrapped(torch.Tensor):
            pass

        h = h.as_subclass(Wrapped)
    if case == "FLOP counter":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False):
            assert na.applies(h) == expected
    elif case == "vmap":
        from torch.func import vmap

        assert not vmap(lambda t: torch.tensor(na.applies(h)))(torch.zeros(2)).any()
    elif case == "forward-mode AD":
        import torch.autograd.forward_ad as fwad

        with fwad.dual_level():
            assert na.applies(h) == expected
    else:
        assert na.applies(h) == expected


def test_feed_forward_goes_through_it_and_matches_pytorch(monkeypatch):
    """The README model's feed-forward in training: same output and gradients with the kernel and without."""
    torch.manual_seed(0)
    ff = FeedForward(64, mult=4)
    x = torch.randn(2, 30, 64, requires_grad=True)
    calls = []
    original = na.geglu
    monkeypatch.setattr(na, "geglu", lambda *args: calls.append(1) or original(*args))
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(na, "applies", lambda h: False)
        out = ff(x)
        out.square().mean().backward()
        results.append((out.detach(), x.grad.clone(), ff.fc1.weight.grad.clone(), ff.fc1.bias.grad.clone(),
                        ff.fc2.weight.grad.clone()))
        x.grad = None
        ff.zero_grad()
        assert len(calls) == 1  # the native pass only
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation, autocast", [("geglu", True), ("gelu_tanh", False), ("gelu_tanh", True)])
def test_feed_forward_goes_through_the_kernel_in_training(activation, autocast, monkeypatch):
    """The README model's GEGLU feed-forward under CPU bfloat16 autocast, and DeepMind's tanh-GELU one in float32 and
    under autocast: in training the kernel runs once, in the activations' dtype, and output and gradients match
    PyTorch's path (float32: to rounding; bfloat16: to its precision, PyTorch rounding after every operation)."""
    torch.manual_seed(0)
    ff = FeedForward(64, mult=4 if activation == "geglu" else 1, activation=activation)
    x = torch.randn(2, 30, 64, requires_grad=True)
    calls, original = [], getattr(na, activation)
    monkeypatch.setattr(na, activation, lambda h, bias=None: calls.append((h.dtype, bias is not None)) or original(h, bias))
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(na, "applies", lambda *args: False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = ff(x)
        out.float().square().mean().backward()
        results.append((out.float().detach(), x.grad.clone(), ff.fc1.weight.grad.clone(), ff.fc1.bias.grad.clone()))
        x.grad = None
        ff.zero_grad()
    # float32: the first product's bias is added by the kernel (takes_bias); under autocast by the product
    assert calls == [(torch.bfloat16, False) if autocast else (torch.float32, True)]
    tolerance = 0.03 if autocast else 1e-5
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * b.abs().max().item())


# softmax: rows wider and narrower than a vector (masked tails), bfloat16 rows longer than the kernel's float32
# buffer (4096: recomputed exponentials), one-element rows; all at least 2^15 elements (smaller calls stay PyTorch's)
_SOFTMAX_SHAPES = [(2, 8, 128, 128), (1000, 33), (8, 5000), (1 << 15, 1)]


@pytest.mark.parametrize("shape", _SOFTMAX_SHAPES)
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: most probabilities underflow far below the largest
def test_softmax_values_and_gradients_match_float64(shape, scale):
    x, grad = _sample(5, shape, scale)
    assert na.applies(x, "softmax")
    out = dense.softmax(x)
    out.backward(grad)
    xd = x.detach().double().requires_grad_()
    ref = xd.softmax(-1)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", _SOFTMAX_SHAPES)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_softmax_bfloat16_is_computed_in_float32_and_rounded_once(shape, scale):
    """float64's softmax of the same inputs rounded once to bfloat16 (at most 1% of entries one step off: float32
    roundings tipping a tie); PyTorch's bfloat16 softmax is held to the same."""
    generator = torch.Generator().manual_seed(6)
    x = (torch.randn(shape, generator=generator) * scale).bfloat16()
    rounded = x.double().softmax(-1).bfloat16()
    for out in (na.softmax(x), x.softmax(-1)):
        assert out.dtype == torch.bfloat16
        off = out != rounded
        assert off.float().mean() <= 0.01
        step = (rounded.double().abs() * 2.0 ** -7).clamp_min(1e-38)
        assert ((out.double() - rounded.double()).abs()[off] <= step[off] * 1.001).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_keeps_pytorchs_nan_and_infinity(dtype):
    """A NaN or +inf in a row, or a row of -inf, gives a row of NaN; -inf elsewhere gives exactly 0."""
    x = torch.randn(1024, 40).to(dtype)
    x[0, 3], x[1, 39], x[2] = float("nan"), float("inf"), float("-inf")
    x[3, :39] = float("-inf")
    x[4, ::2] = float("-inf")
    out = na.softmax(x)
    tolerance = 2.0 ** -8 if dtype == torch.bfloat16 else 2e-6  # one step of bfloat16; float32 rounding
    torch.testing.assert_close(out, x.softmax(-1), equal_nan=True, rtol=tolerance, atol=1e-7)
    assert out[:3].isnan().all() and not out[3:].isnan().any()
    assert (out[3, :39] == 0).all() and out[3, 39] == 1 and (out[4, ::2] == 0).all()


def test_softmax_strided_input_and_second_order_gradients():
    base = torch.randn(64, 9, 130, requires_grad=True)
    x = base[..., 1:129]  # rows spaced out: copied to contiguous rows
    first = torch.autograd.grad((na.softmax(x) * torch.arange(128.0)).sum(), base, create_graph=True)[0]
    second = torch.autograd.grad(first.square().sum(), base)[0]
    bd = base.detach().double().requires_grad_()
    ref_first = torch.autograd.grad((bd[..., 1:129].softmax(-1) * torch.arange(128.0)).sum(), bd, create_graph=True)[0]
    ref_second = torch.autograd.grad(ref_first.square().sum(), bd)[0]
    torch.testing.assert_close(first.double(), ref_first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second.double(), ref_second, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case, expected", [
    ("float32", True), ("bfloat16", True), ("float64", False), ("small", False), ("scalar", False), ("vmap", False),
])
def test_softmax_where_it_applies(case, expected):
    dtype = {"bfloat16": torch.bfloat16, "float64": torch.float64}.get(case, torch.float32)
    x = torch.randn({"small": (4, 32), "scalar": ()}.get(case, (256, 128)), dtype=dtype)
    if case == "vmap":
        from torch.func import vmap

        assert not vmap(lambda t: torch.tensor(na.applies(x, "softmax")))(torch.zeros(2)).any()
    else:
        assert na.applies(x, "softmax") == expected


def test_no_compiler_falls_back(no_compiler):
    h = torch.randn(3, 32)
    assert not na.applies(h) and not na.applies(h, "gelu_tanh") and not na.applies(torch.randn(256, 128), "softmax")
    torch.testing.assert_close(dense.geglu(h), h[:, :16] * F.gelu(h[:, 16:]))
    torch.testing.assert_close(dense.gelu(h, "tanh"), F.gelu(h, approximate="tanh"))


def test_a_changed_shared_header_rebuilds(monkeypatch, tmp_path):
    """The cache key covers ``vector.h``, which every kernel includes."""
    sources = tmp_path / "sources"
    sources.mkdir()
    for name in ("activations.c", "vector.h"):
        (sources / name).write_bytes((kernels._SOURCES / name).read_bytes())
    monkeypatch.setattr(kernels, "_SOURCES", sources)
    monkeypatch.setenv("PERCEIVERS_CACHE", str(tmp_path / "cache"))
    first = kernels._build("activations")
    (sources / "vector.h").write_text((sources / "vector.h").read_text() + "\n/* changed */\n")
    second = kernels._build("activations")
    assert first is not None and second is not None and first != second
