"""The dense layer's oneDNN path: the same values and gradients as ``F.linear``, taken only where it applies."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perceivers.layers import Linear, linear, onednn_enabled, use_onednn
from perceivers.layers import dense as linear_module

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def _reference(x, w, b, grad):
    """Values and gradients of ``x Wᵀ + b`` in float64."""
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    out = F.linear(x64, w64, b64)
    out.backward(grad.double())
    return out, x64.grad, w64.grad, None if b64 is None else b64.grad


@pytest.mark.parametrize("shape", [(300, 512), (4, 150, 512), (2, 3, 100, 512)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("out_features", [384, 640])  # the weight gradient is computed transposed when out > in
def test_values_and_gradients_match_float64(shape, bias, enabled, out_features):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(out_features, 512, generator=g, requires_grad=True)
    b = torch.randn(out_features, generator=g, requires_grad=True) if bias else None
    with use_onednn(enabled):
        out = linear(x, w, b)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    assert ("OneDNN" in type(out.grad_fn).__name__) == enabled
    ref = _reference(x, w, b, grad)
    got = (out, x.grad, w.grad, None if b is None else b.grad)
    for a, r in zip(got, ref):
        if r is not None:
            assert a.dtype == torch.float32
            assert (a.double() - r).abs().max() <= 2e-6 * r.abs().max()


def test_non_contiguous_operands():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 600, generator=g).t()  # [600, 512], transposed
    w = torch.randn(512, 256, generator=g).t()  # [256, 512], transposed (a tied weight's view)
    with use_onednn(True):
        out = linear(x, w)
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-5, atol=1e-4)


def test_weights_with_spaced_rows_reach_onednn_dense(monkeypatch):
    """A weight sliced from a wider matrix (and, in the backward, an input sliced so) is handed to oneDNN
    contiguous or transposed-contiguous: spaced rows send it to a reference kernel ~2000x slower."""
    seen = []
    primitive = torch.ops.mkldnn._linear_pointwise

    def spy(x, w, *args):
        seen.append(w.is_contiguous() or w.t().is_contiguous())
        return primitive(x, w, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 300, 1024, generator=g)[..., :512].requires_grad_()
    w = torch.randn(384, 1024, generator=g)[:, :512].requires_grad_()
    with use_onednn(True):
        out = linear(x, w)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    assert len(seen) == 3 and all(seen)
    ref = _reference(x, w, None, grad)
    for a, r in zip((out, x.grad, w.grad), ref):
        assert (a.double() - r).abs().max() <= 2e-6 * r.abs().max()


@pytest.mark.parametrize("out_features", [48, 80])  # out > in: computed transposed, returned as a view
def test_weight_gradient_of_a_long_sum_goes_to_mm(out_features, monkeypatch):
    """Rows ≥ _LONG_SUM × (out + in): the weight gradient is ``torch.mm`` (MKL splits the sum), with the
    same values and the same layout as oneDNN's path; shorter sums stay on oneDNN."""
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append(a.shape) or mm(a, b))
    monkeypatch.setattr(linear_module, "_MIN_MACS", 1)
    g = torch.Generator().manual_seed(8)
    for rows, long_sum in ((48 * (out_features + 64), True), (47 * (out_features + 64), False)):
        x = torch.randn(rows, 64, generator=g, requires_grad=True)
        w = torch.randn(out_features, 64, generator=g, requires_grad=True)
        with use_onednn(True):
            out = linear(x, w)
        grad = torch.randn(out.shape, generator=g)
        calls.clear()
        out.backward(grad)
        assert bool(calls) == long_sum
        direct = linear_module._onednn_weight_grad(grad, x.detach())
        assert direct.shape == w.shape and direct.is_contiguous() == (out_features <= 64)
        ref = _reference(x, w, None, grad)
        for a, r in zip((x.grad, w.grad), ref[1:3]):
            assert (a.double() - r).abs().max() <= 2e-6 * r.abs().max()


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("shape", [(2048, 512), (80, 48), (37, 29), (100, 16), (1, 70)])
def test_weight_gradient_operand_transposed_natively(shape, native, monkeypatch):
    """The weight gradient's first operand is transposed into a contiguous matrix by the native kernel (edges
    of partial tiles, whole tiles, rows spaced out in memory), or left a view for oneDNN to copy when it is off."""
    if not native:
        monkeypatch.setenv("PERCEIVERS_NATIVE", "0")
    from perceivers import kernels

    built = kernels.load("transpose") is not None
    g = torch.Generator().manual_seed(2)
    for a in (torch.randn(shape, generator=g), torch.randn(shape[0], shape[1] + 7, generator=g)[:, :shape[1]]):
        t = linear_module._transposed(a)
        assert torch.equal(t, a.t())
        assert t.is_contiguous() if built else t.data_ptr() == a.data_ptr()  # else a view of ``a``
    grad, x = torch.randn(300, 96, generator=g), torch.randn(300, 40, generator=g)
    torch.testing.assert_close(linear_module._onednn_weight_grad(grad, x), grad.t() @ x, rtol=1e-5, atol=1e-5)


def test_second_order_gradients():
    """``create_graph=True`` differentiates the backward too (it uses differentiable products then)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 256, generator=g, requires_grad=True)
    w = (torch.randn(128, 256, generator=g) / 16).requires_grad_()  # pre-activations ~1: tanh not saturated
    results = []
    for enabled in (True, False):
        with use_onednn(enabled):
            out = linear(x, w).tanh().sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.pow(2).sum(), w)
        results.append(gw)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("operand", ["weight", "input"])
def test_sparse_operands_take_f_linear(operand):
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(300, 512, generator=g), torch.randn(1024, 512, generator=g)
    with use_onednn(True):
        out = linear(x.to_sparse(), w) if operand == "input" else linear(x, w.to_sparse())
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", ["small", "float64", "autocast", "no-grad"])
def test_where_the_plain_path_is_taken(case):
    x = torch.randn(64, 512, requires_grad=True)
    w = torch.randn(256, 512, requires_grad=True)
    with use_onednn(True):
        if case == "small":
            out = linear(x[:2, :16], w[:8, :16])  # 256 multiply-adds: below the threshold
            assert "OneDNN" not in type(out.grad_fn).__name__
        elif case == "float64":
            out = linear(x.double(), w.double())
            assert "OneDNN" not in type(out.grad_fn).__name__
        elif case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = linear(x, w)
            assert out.dtype == torch.bfloat16
        else:
            with torch.no_grad():
                out = linear(x, w)
            assert out.grad_fn is None
            torch.testing.assert_close(out, x.detach() @ w.detach().t(), rtol=1e-5, atol=1e-4)


def _graph_targets(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_compiled_graphs_keep_the_onednn_operators():
    """``torch.compile`` calls the products as ``perceivers::`` operators (forward and backward), with the
    plain layer's values and gradients; with oneDNN off it sees ``F.linear`` (the setting is guarded)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    layer = Linear(512, 1024)  # out > in: the weight gradient comes back transposed
    x = torch.randn(4, 64, 512, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)

    def grads(fn):
        x.grad, layer.weight.grad, layer.bias.grad = None, None, None
        out = fn(x)
        out.square().sum().backward()
        return out, x.grad, layer.weight.grad, layer.bias.grad

    with use_onednn(True):
        (out, *got), code = run_and_get_code(lambda: grads(compiled))
    expected = grads(lambda t: F.linear(t, layer.weight, layer.bias))
    for a, b in zip((out, *got), expected):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    source = "\n".join(code)
    assert "perceivers.onednn_linear" in source and "perceivers.onednn_weight_grad" in source
    assert "extern_kernels.mm" not in source and "extern_kernels.addmm" not in source
    with use_onednn(False):
        _, code = run_and_get_code(lambda: grads(compiled))
    assert "perceivers.onednn" not in "\n".join(code)


def test_exported_graphs_see_plain_linear():
    layer = Linear(512, 256)
    with use_onednn(True):
        program = torch.export.export(layer, (torch.randn(64, 512),))
    targets = _graph_targets(program.graph_module)
    assert "aten.linear.default" in targets and not any("perceivers" in t for t in targets)


def test_linear_is_an_nn_linear_with_the_same_state():
    torch.manual_seed(3)
    ours = Linear(32, 16)
    torch.manual_seed(3)
    plain = nn.Linear(32, 16)
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, plain.state_dict()[k])


def test_override_nests_and_restores():
    default = onednn_enabled()
    with use_onednn(False):
        assert not onednn_enabled()
        with use_onednn(True):
            assert onednn_enabled()
        assert not onednn_enabled()
    assert onednn_enabled() == default


@pytest.mark.parametrize(("value", "expected"), [("0", False), ("1", True)])
def test_environment_variable(value, expected):
    code = "from perceivers.layers import onednn_enabled; print(onednn_enabled())"
    env = {**os.environ, "PERCEIVERS_ONEDNN": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)


def test_default_follows_the_processor(monkeypatch):
    monkeypatch.delenv("PERCEIVERS_ONEDNN", raising=False)
    linear_module._default.cache_clear()
    try:
        for vendor, expected in (("AuthenticAMD", True), ("GenuineIntel", False)):
            monkeypatch.setattr(linear_module, "_cpu_vendor", lambda vendor=vendor: vendor)
            monkeypatch.setattr(linear_module.platform, "machine", lambda: "x86_64")
            linear_module._default.cache_clear()
            assert linear_module._default() is expected
    finally:
        linear_module._default.cache_clear()


@pytest.mark.parametrize(("vendor", "amx", "setting", "expected"), [
    ("AuthenticAMD", False, None, True),  # where the float32 products take oneDNN
    ("GenuineIntel", True, None, True),   # AMX: oneDNN's bfloat16 paths, MKL's float32 products
    ("GenuineIntel", False, None, False),
    ("GenuineIntel", True, "0", False),   # PERCEIVERS_ONEDNN turns both off (or on)
    ("GenuineIntel", False, "1", True),
])
def test_bfloat16_default_follows_the_processor(vendor, amx, setting, expected, monkeypatch):
    from perceivers import kernels

    if setting is None:
        monkeypatch.delenv("PERCEIVERS_ONEDNN", raising=False)
    else:
        monkeypatch.setenv("PERCEIVERS_ONEDNN", setting)
    monkeypatch.setattr(linear_module, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(linear_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kernels, "has_amx", lambda: amx)
    caches = (linear_module._default, linear_module._default_bf16)
    try:
        for cache in caches:
            cache.cache_clear()
        assert linear_module._default_bf16() is (expected and torch.backends.mkldnn.is_available())
    finally:
        for cache in caches:
            cache.cache_clear()


def test_model_training_step_is_the_same_either_way():
    """One optimiser step of a small Perceiver: the two paths agree to float32 tolerance."""
    from perceivers import Perceiver

    results = []
    for enabled in (True, False):
        torch.manual_seed(0)
        model = Perceiver(input_channels=3, input_axis=2, num_freq_bands=4, max_freq=8.0, depth=2, num_latents=64,
                          latent_dim=128, cross_dim_head=32, latent_dim_head=32, num_classes=10)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(4, 16, 16, 3, generator=torch.Generator().manual_seed(1))
        with use_onednn(enabled):
            for _ in range(2):
                opt.zero_grad()
                model(x).logsumexp(-1).mean().backward()
                opt.step()
            results.append(model(x).detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


def test_function_transforms_and_forward_mode_see_plain_linear():
    """``torch.func`` (vmap, per-sample gradients, jacrev) and forward-mode AD work as with ``nn.Linear``."""
    import torch.autograd.forward_ad as fwad
    from torch.func import functional_call, grad, jacrev, vmap

    torch.manual_seed(4)
    layer = Linear(512, 1024)
    x = torch.randn(4, 300, 512)
    params = dict(layer.named_parameters())

    def loss(p, xi):
        return functional_call(layer, p, (xi,)).square().sum()

    with use_onednn(True):
        batched = vmap(layer)(x)
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)["weight"]
        jac = jacrev(lambda xi: linear(xi, layer.weight[:8]))(x[0, :2])
        with fwad.dual_level():
            tangent = torch.randn_like(x)
            jvp = fwad.unpack_dual(layer(fwad.make_dual(x, tangent))).tangent
    torch.testing.assert_close(batched, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert per_sample.shape == (4, 1024, 512)
    torch.testing.assert_close(per_sample[1], torch.func.grad(loss)(params, x[1])["weight"], rtol=1e-4, atol=1e-3)
    assert jac.shape == (2, 8, 2, 512)
    torch.testing.assert_close(jvp, F.linear(tangent, layer.weight), rtol=1e-5, atol=1e-5)


def _gelu_reference(x, w, b, kind):
    """``gelu(x Wᵀ + b)`` (``kind`` 'none' / 'tanh') or GEGLU (``kind`` 'geglu') in float64."""
    h = F.linear(x.double(), w.double(), None if b is None else b.double())
    if kind == "geglu":
        value, gate = h.chunk(2, dim=-1)
        return value * F.gelu(gate)
    return F.gelu(h, approximate=kind)


def _fused_calls(monkeypatch) -> list[str]:
    """Record the epilogue of every oneDNN product (``attr``: 'none', 'gelu', or 'mul' for binary ones)."""
    calls: list[str] = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, x, w, b, attr, scalars, algorithm):
            calls.append(attr)
            return real(x, w, b, attr, scalars, algorithm)

        def binary(self, x, other, w, b, attr):
            calls.append(attr)
            return real.binary(x, other, w, b, attr)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
    return calls


@pytest.mark.parametrize("kind", ["none", "tanh", "geglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_activation_in_the_product_epilogue(kind, bias, monkeypatch):
    """Without autograd the GELU (and GEGLU's product) run inside the oneDNN products; with autograd, or
    with oneDNN off, the plain operations run; all agree with float64."""
    from perceivers.layers.dense import linear_geglu, linear_gelu

    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 200, 256, generator=g) * 2
    w = torch.randn(1024, 256, generator=g) * 0.1
    b = torch.randn(1024, generator=g) if bias else None
    fn = linear_geglu if kind == "geglu" else lambda *a: linear_gelu(*a, approximate=kind)
    ref = _gelu_reference(x, w, b, kind)
    calls = _fused_calls(monkeypatch)
    with use_onednn(True), torch.no_grad():
        out = fn(x, w, b)
    assert calls == (["gelu", "mul"] if kind == "geglu" else ["gelu"])
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    calls.clear()
    with use_onednn(False), torch.no_grad():
        assert (fn(x, w, b).double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert calls == []
    wg = w.clone().requires_grad_()
    with use_onednn(True):
        out = fn(x, wg, b)
    assert out.grad_fn is not None and "gelu" not in calls
    out.sum().backward()
    w64 = w.double().requires_grad_()
    _gelu_reference(x, w64, b, kind).sum().backward()
    assert (wg.grad.double() - w64.grad).abs().max() <= 1e-5 * w64.grad.abs().max()


@pytest.mark.parametrize("case, expected", [
    ("latent array", True), ("autograd", True), ("many rows", False), ("small", False), ("autocast", False),
    ("float64", False), ("no AMX", False), ("use_onednn(False)", False), ("PERCEIVERS_ONEDNN=0", False),
])
def test_which_float32_products_take_onednn_on_amx(case, expected, monkeypatch):
    """On a processor with AMX, where float32 products stay MKL's by default, those of at most 512 rows and 2²⁶
    multiply-adds (a latent array's at batch 1) go to oneDNN, unless a switch decides."""
    from perceivers import kernels

    monkeypatch.delenv("PERCEIVERS_ONEDNN", raising=False)
    monkeypatch.setattr(linear_module, "_auto", lambda: False)  # an Intel processor's default
    monkeypatch.setattr(kernels, "has_amx", lambda: case != "no AMX")
    if case == "PERCEIVERS_ONEDNN=0":
        monkeypatch.setenv("PERCEIVERS_ONEDNN", "0")
    x = torch.randn(1, 600 if case == "many rows" else 256, 512, dtype=torch.float64 if case == "float64" else None)
    w = torch.randn(64 if case == "small" else 4096, 512, dtype=x.dtype, requires_grad=case == "autograd")
    b = torch.randn(w.shape[0], dtype=x.dtype)
    with (use_onednn(False) if case == "use_onednn(False)" else use_onednn(None)), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        assert linear_module._onednn_on_amx(x, w, b) is expected
        assert linear_module._use_onednn(x, w, b) is expected


@pytest.mark.parametrize("kind", ["none", "tanh", "geglu"])
def test_float32_inference_of_a_latent_array_on_amx(kind, monkeypatch):
    """There the product (and its activation, in the epilogue) runs on oneDNN and agrees with float64."""
    from perceivers import kernels
    from perceivers.layers.dense import linear_geglu, linear_gelu

    monkeypatch.delenv("PERCEIVERS_ONEDNN", raising=False)
    monkeypatch.setattr(linear_module, "_auto", lambda: False)
    monkeypatch.setattr(kernels, "has_amx", lambda: True)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 256, 512, generator=g)
    w = torch.randn(2048, 512, generator=g) * 0.05
    b = torch.randn(2048, generator=g)
    fn = linear_geglu if kind == "geglu" else lambda *a: linear_gelu(*a, approximate=kind)
    calls = _fused_calls(monkeypatch)
    with torch.no_grad():
        out, plain = fn(x, w, b), linear(x, w, b)
    assert calls == (["gelu", "mul"] if kind == "geglu" else ["gelu"]) + ["none"]
    ref = _gelu_reference(x, w, b, kind)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    torch.testing.assert_close(plain.double(), F.linear(x.double(), w.double(), b.double()), rtol=1e-5, atol=1e-4)


def test_float32_training_of_a_latent_array_on_amx(monkeypatch):
    """In training there the forward product is oneDNN's and the backward's two are MKL's; values and all three
    gradients agree with float64, and the product's gradient is differentiable again (create_graph)."""
    from perceivers import kernels

    monkeypatch.delenv("PERCEIVERS_ONEDNN", raising=False)
    monkeypatch.setattr(linear_module, "_auto", lambda: False)
    monkeypatch.setattr(kernels, "has_amx", lambda: True)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 256, 512, generator=g, requires_grad=True)
    w = (torch.randn(1024, 512, generator=g) * 0.05).requires_grad_()
    b = torch.randn(1024, generator=g, requires_grad=True)
    grad = torch.randn(1, 256, 1024, generator=g)
    calls = _fused_calls(monkeypatch)
    out = linear(x, w, b)
    assert type(out.grad_fn).__name__ == "_OneDNNForwardLinearBackward" and calls == ["none"]
    out.backward(grad)
    assert calls == ["none"]  # the backward's products are not oneDNN's
    refs = _reference(x, w, b, grad)
    for got, ref in zip((out, x.grad, w.grad, b.grad), refs):
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-4)
    first = torch.autograd.grad(linear(x, w, b).square().sum(), w, create_graph=True)[0]
    assert first.requires_grad


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bfloat16 kernels")
@pytest.mark.parametrize("kind", ["none", "geglu"])
def test_activation_in_the_product_epilogue_under_bfloat16_autocast(kind, monkeypatch):
    """Under CPU bfloat16 autocast, without autograd, the epilogues run in oneDNN's bfloat16 products: a
    bfloat16 result as close to float64 as autocast's own ``F.linear`` + activation."""
    from perceivers.layers.dense import linear_geglu, linear_gelu

    monkeypatch.setenv("PERCEIVERS_BF16_AS_FLOAT32", "0")  # oneDNN's bfloat16 products on any processor
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 200, 256, generator=g)
    w = torch.randn(1024, 256, generator=g) * 0.1
    b = torch.randn(1024, generator=g)
    fn = linear_geglu if kind == "geglu" else linear_gelu
    ref = _gelu_reference(x, w, b, kind)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = F.linear(x, w, b)
        plain = h.chunk(2, -1)[0] * F.gelu(h.chunk(2, -1)[1]) if kind == "geglu" else F.gelu(h)
        calls = _fused_calls(monkeypatch)
        with use_onednn(True):  # the default on AMD processors only
            out = fn(x, w, b)
    assert calls == (["gelu", "mul"] if kind == "geglu" else ["gelu"])
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    plain_error = (plain.double() - ref).abs().max()
    assert (out.double() - ref).abs().max() <= 1.5 * plain_error
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autograd: autocast's own operations
        assert fn(x, w.requires_grad_(), b).dtype == torch.bfloat16
    assert calls == []


@pytest.mark.parametrize("bias", [True, False])
def test_bfloat16_autocast_inference_casts_the_weight_itself(bias, monkeypatch):
    """Under CPU bfloat16 autocast without autograd the layer casts its float32 weight itself (a copy freed after the
    product, not kept in autocast's cache to the end of the region): the same bits as autocast's own ``F.linear``;
    with autograd, autocast casts as usual."""
    monkeypatch.setenv("PERCEIVERS_BF16_AS_FLOAT32", "0")
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 200, 256, generator=g), torch.randn(512, 256, generator=g, requires_grad=True)
    b = torch.randn(512, generator=g, requires_grad=True) if bias else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(x, w, b)
        weights, real = [], F.linear
        with torch.no_grad(), monkeypatch.context() as patch:
            assert linear_module._uncached_autocast(x, w, b)
            patch.setattr(linear_module.F, "linear", lambda *a: weights.append(a[1].dtype) or real(*a))
            out = linear(x, w, b)
        assert weights == [torch.bfloat16]  # cast before the call, so autocast has nothing to cast (and keep)
        assert not linear_module._uncached_autocast(x, w, b)  # recorded for a backward
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.detach())
    assert not linear_module._uncached_autocast(x, w, b)  # outside autocast


# ------------------------------------------------------------- bfloat16 products in float32 (no bfloat16 arithmetic)


@pytest.mark.parametrize("kind", ["autocast", "bf16-true"])
@pytest.mark.parametrize("bias", [True, False])
def test_bfloat16_products_in_float32(kind, bias, monkeypatch):
    """Where bfloat16 products would be emulated (``PERCEIVERS_BF16_AS_FLOAT32=1`` forces it on any processor),
    a bfloat16 dense layer (autocast, or bfloat16 weights and inputs) returns bfloat16 computed in float32 from
    its operands as they come: the result within one bfloat16 rounding of float64, the gradients as close as
    PyTorch's own bfloat16 layer (or within one rounding), in the operands' dtypes; the backward keeps the input
    in bfloat16 (autocast's memory) and the weight itself."""
    g = torch.Generator().manual_seed(3)
    dtype = torch.bfloat16 if kind == "bf16-true" else torch.float32
    x = torch.randn(3, 70, 96, generator=g).to(dtype)
    w = (torch.randn(160, 96, generator=g) * 0.1).to(dtype)
    b = torch.randn(160, generator=g).to(dtype) if bias else None
    grad = torch.randn(3, 70, 160, generator=g).bfloat16()
    ref = _reference(x, w, b, grad)
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("PERCEIVERS_BF16_AS_FLOAT32", flag)
        xs, ws = (t.clone().requires_grad_() for t in (x, w))
        bs = None if b is None else b.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "autocast"):
            out = linear(xs, ws, bs)
        assert out.dtype == torch.bfloat16
        assert ("Bf16InFloat32" in type(out.grad_fn).__name__) == (flag == "1")
        if flag == "1":
            assert [t.dtype for t in out.grad_fn.saved_tensors] == [torch.bfloat16, dtype]
            assert out.grad_fn.saved_tensors[1] is ws
        out.backward(grad)
        got = (out, xs.grad, ws.grad, None if bs is None else bs.grad)
        assert [t.dtype for t in got if t is not None] == [torch.bfloat16] + [dtype] * (2 + bias)
        results[flag] = got
    assert (results["1"][0].double() - ref[0]).abs().max() <= 2**-8 * ref[0].abs().max()
    for ours, pytorch, want in zip(results["1"], results["0"], ref, strict=True):
        if want is not None:
            error = (ours.double() - want).abs().max()
            assert error <= max((pytorch.double() - want).abs().max(), 2**-8 * want.abs().max())


@pytest.mark.parametrize("kind", ["none", "tanh", "geglu"])
def test_bfloat16_activation_in_float32_without_grad(kind, monkeypatch):
    """Without autograd, where bfloat16 products run in float32, the feed-forward's activation is applied to the
    float32 product and the result rounded to bfloat16 once: within one bfloat16 rounding of float64."""
    from perceivers.layers.dense import linear_geglu, linear_gelu

    monkeypatch.setenv("PERCEIVERS_BF16_AS_FLOAT32", "1")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 50, 64, generator=g)
    w = torch.randn(256, 64, generator=g) * 0.1
    b = torch.randn(256, generator=g)
    ref = _gelu_reference(x, w, b, kind)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_geglu(x, w, b) if kind == "geglu" else linear_gelu(x, w, b, approximate=kind)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.double() - ref).abs().max() <= 2**-8 * ref.abs().max()


def test_bfloat16_products_in_float32_where_bfloat16_is_emulated(monkeypatch):
    """By default the float32 path follows the processor (``kernels.emulates_bf16``), never serves float32 outside
    autocast, and ``PERCEIVERS_BF16_AS_FLOAT32=0`` turns it off."""
    from perceivers import kernels

    monkeypatch.delenv("PERCEIVERS_BF16_AS_FLOAT32", raising=False)
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    for emulated in (True, False):
        monkeypatch.setattr(kernels, "emulates_bf16", lambda emulated=emulated: emulated)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear_module.bf16_in_float32(x, w) is emulated
        assert linear_module.bf16_in_float32(x.bfloat16(), w.bfloat16()) is emulated
        assert not linear_module.bf16_in_float32(x, w)  # float32 outside autocast
    monkeypatch.setattr(kernels, "emulates_bf16", lambda: True)
    monkeypatch.setenv("PERCEIVERS_BF16_AS_FLOAT32", "0")
    assert not linear_module.bf16_in_float32(x.bfloat16(), w.bfloat16())


@pytest.mark.parametrize("kind", ["autocast", "bf16-true"])
def test_bfloat16_products_in_float32_second_order(kind, monkeypatch):
    """The float32 path's backward is differentiable (``create_graph=True``), through the weight's gradient back to a
    float32 input too: second-order gradients match PyTorch's bfloat16 layer to bfloat16 precision."""
    g = torch.Generator().manual_seed(5)
    dtype = torch.bfloat16 if kind == "bf16-true" else torch.float32
    x, w = torch.randn(6, 32, generator=g).to(dtype), torch.randn(24, 32, generator=g).to(dtype)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("PERCEIVERS_BF16_AS_FLOAT32", flag)
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "autocast"):
            out = linear(xs, ws)
        assert ("Bf16InFloat32" in type(out.grad_fn).__name__) == (flag == "1")
        gx, gw = torch.autograd.grad(out.float().square().sum(), (xs, ws), create_graph=True)
        penalty = gx.float().square().sum() + gw.float().square().sum()
        results.append([t.double() for t in torch.autograd.grad(penalty, (xs, ws))])
    for ours, pytorch in zip(*results, strict=True):
        torch.testing.assert_close(ours, pytorch, atol=0.02 * pytorch.abs().max().item(), rtol=0.0)
