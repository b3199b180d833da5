"""The native grid cross-attention (separable position scores) against the plain attention."""

import pytest
import torch
from torch import nn

from perceivers import Perceiver, kernels
from perceivers.layers import Attention, FourierPositionEncoding, GridContext
from perceivers.layers import grid_attention as ga

pytestmark = pytest.mark.skipif(not ga.available(), reason="no C compiler for the native kernel")


def _problem(d: int, height: int, width: int, *, batch: int = 2, heads: int = 2, offset: float = 0.0, affine=True):
    torch.manual_seed(d * 100 + height)
    enc = FourierPositionEncoding(2, 4, 10.0, layout="lucidrains")
    t_h, t_w = enc.axis_tables((height, width))
    c = d + enc.num_channels
    attn = Attention(24, c, num_heads=heads, qk_channels=8 * heads, v_channels=6 * heads, out_dim=24).eval()
    norm = nn.LayerNorm(c, elementwise_affine=affine)
    if affine:
        nn.init.normal_(norm.weight, 1.0, 0.3)
        nn.init.normal_(norm.bias, 0.0, 0.3)
    data = torch.randn(batch, height * width, d) * 2 + offset
    context = torch.cat((data, (t_h[:, None] + t_w[None]).reshape(1, -1, enc.num_channels).expand(batch, -1, -1)), -1)
    x = torch.randn(batch, 5, 24)
    return attn, norm, x, GridContext(data.unflatten(1, (height, width)), (height, width), (t_h, t_w)), context


def _count_kernel_calls(monkeypatch) -> list:
    """A list that grows by one at every grid kernel call."""
    calls = []
    real = ga.grid_cross_attention
    monkeypatch.setattr(ga, "grid_cross_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _param_grads(model, loss) -> dict:
    model.zero_grad(set_to_none=True)
    loss().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5 * max(1.0, w.abs().max().item()), msg=name)


@pytest.mark.parametrize(
    ("d", "height", "width", "rows", "offset", "affine"),
    [(3, 12, 20, 5, 0.0, True), (1, 7, 9, 7, 0.0, True), (6, 10, 3, 4, 0.0, False), (3, 9, 11, 2, 300.0, True),
     (3, 1, 37, 1, 0.0, True), (2, 37, 1, 5, 0.0, True)],
)
def test_matches_plain_attention(d, height, width, rows, offset, affine):
    attn, norm, x, grid, context = _problem(d, height, width, offset=offset, affine=affine)
    query_mask = torch.tensor([[True, False, True, True, True], [True, True, True, False, True]])
    with torch.no_grad():
        assert ga.applies(attn, norm, x, grid, None)
        got = ga.grid_cross_attention(attn, norm, x, grid, query_mask=query_mask, chunk_pixels=rows * width)
        attn.fold_kv = False  # the projected keys and values: an independent computation
        want = attn(x, norm(context), query_mask=query_mask)
    assert got.shape == want.shape == (2, 5, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_buffers_do_not_follow_the_default_dtype(default_dtype):
    """The kernel's float32 buffers stay float32 under another default dtype (bf16-true training sets one)."""
    attn, norm, x, grid, _ = _problem(3, 12, 20)
    x.requires_grad_(True)

    def run():
        x.grad = None
        out = ga.grid_cross_attention(attn, norm, x, grid, chunk_pixels=5 * 20)
        out.square().sum().backward()
        return out.detach(), x.grad.clone()

    want = run()
    with default_dtype(torch.float64):
        got = run()
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("width", [20, 37])
def test_sharp_scores_rescale_the_running_sums(width):
    """Queries scaled so that scores span hundreds: a later image row's maximum passes the first row's by more
    than the kernel's margin (10), so the kernel rescales its sums to it and sums that row again; the output and
    the gradients still equal plain attention's."""
    attn, norm, x, grid, context = _problem(3, 16, width, heads=1)
    x = (x * 40).requires_grad_(True)
    with torch.no_grad():
        scale = attn.qk_channels**-0.5
        scores = attn.to_q(x) @ attn.to_k(norm(context)).transpose(1, 2) * scale  # [B, Q, H·W], one head
    assert (scores.amax(-1) - scores[..., :width].amax(-1)).max() > 10
    upstream = torch.randn(2, 5, 24)
    got = ga.grid_cross_attention(attn, norm, x, grid, chunk_pixels=3 * width)
    (grad_got,) = torch.autograd.grad((got * upstream).sum(), x)
    attn.fold_kv = False
    want = attn(x, norm(context))
    (grad_want,) = torch.autograd.grad((want * upstream).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-5 * grad_want.abs().max().item())


@pytest.mark.parametrize(("d", "heads", "rows", "affine"), [(3, 2, 5, True), (1, 1, 12, True), (5, 3, 4, False)])
def test_gradients_match_plain_attention(d, heads, rows, affine):
    attn, norm, x, grid, context = _problem(d, 12, 20, heads=heads, affine=affine)
    x.requires_grad_(True)
    query_mask = torch.tensor([[True, False, True, True, True], [True, True, True, False, True]])
    upstream = torch.randn(2, 5, 24)
    params = [x, *attn.parameters(), *norm.parameters()]

    def grads(fn):
        for p in params:
            p.grad = None
        (fn() * upstream).sum().backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    assert ga.applies(attn, norm, x, grid, None)  # autograd on: weights and queries get gradients
    got = grads(lambda: ga.grid_cross_attention(attn, norm, x, grid, query_mask=query_mask,
                                                chunk_pixels=rows * 20))
    attn.fold_kv = False  # the projected keys and values: an independent computation
    want = grads(lambda: attn(x, norm(context), query_mask=query_mask))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * max(1.0, w.abs().max().item()))


def test_refuses_what_it_does_not_cover():
    attn, norm, x, grid, _ = _problem(3, 6, 6)
    assert ga.applies(attn, norm, x, grid, None)
    grid.data.requires_grad_(True)
    assert not ga.applies(attn, norm, x, grid, None)  # the image itself needs a gradient
    grid.data.requires_grad_(False)
    attn.train()
    attn.dropout = 0.1
    assert not ga.applies(attn, norm, x, grid, None)  # attention dropout
    attn.eval()
    with torch.no_grad():
        assert ga.applies(attn, norm, x, grid, None)
        assert not ga.applies(attn, norm, x, grid, torch.ones(2, 36, dtype=torch.bool))  # key mask
        assert not ga.applies(attn, norm, x.double(), grid, None)
        attn.fold_kv = False
        assert not ga.applies(attn, norm, x, grid, None)


def test_autocast_computes_in_float32():
    """Under CPU bf16 autocast the kernel still serves, in float32, with float32 out (autocast's rule for
    its float32 operators), in inference and training: the same values and gradients as without autocast."""
    attn, norm, x, grid, _ = _problem(3, 12, 20)
    x.requires_grad_(True)
    results = []
    for autocast in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            assert ga.applies(attn, norm, x, grid, None)
            out = ga.grid_cross_attention(attn, norm, x, grid, chunk_pixels=5 * 20)
        assert out.dtype == torch.float32
        grads = torch.autograd.grad(out.square().sum(), [x, attn.to_q.weight, norm.weight])
        results.append((out, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_inside_autocast(dtype):
    """``loss.backward()`` written inside the autocast block (a common training loop) gets the gradients of a
    backward outside it, but for the rounding autocast gives the other layers' backward products: the kernel's
    tables stay float32 (autocast would make their products bf16/fp16, which the kernel read as float32)."""
    attn, norm, x, grid, _ = _problem(3, 12, 20)
    x.requires_grad_(True)
    results = []
    for inside in (False, True):
        with torch.autocast("cpu", dtype):
            out = ga.grid_cross_attention(attn, norm, x, grid, chunk_pixels=5 * 20)
            if inside:
                grads = torch.autograd.grad(out.square().sum(), [x, attn.to_q.weight, norm.weight])
        if not inside:
            grads = torch.autograd.grad(out.square().sum(), [x, attn.to_q.weight, norm.weight])
        results.append(grads)
    for got, want in zip(*results):
        assert got.isfinite().all()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * want.abs().max().item())


def _readme_like(**kw):
    return Perceiver(num_freq_bands=6, depth=2, max_freq=10.0, input_channels=3, input_axis=2, num_latents=16,
                     latent_dim=32, cross_dim_head=16, latent_dim_head=8, num_classes=5, **kw).eval()


def test_perceiver_stream_uses_the_kernel(monkeypatch):
    torch.manual_seed(0)
    model = _readme_like(cross_heads=2)
    img = torch.randn(2, 40, 24, 3)
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        model.chunk_size = 100  # streamed, 4 image rows a chunk
        native = model(img)
        assert len(calls) == 2  # both cross-attentions
        monkeypatch.setenv("PERCEIVERS_NATIVE", "0")
        streamed = model(img)
        model.chunk_size = 0
        whole = model(img)
    assert len(calls) == 2
    torch.testing.assert_close(native, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_models_use_the_kernel(monkeypatch):
    """A Perceiver under CPU bf16 autocast gives its image to the kernel (not to bf16 streamed
    products) and stays as close to its float32 logits as the bf16 path without the kernel."""
    torch.manual_seed(0)
    model = _readme_like(cross_heads=2)
    img = torch.randn(2, 40, 32, 3)
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        exact = model(img)
        with torch.autocast("cpu", torch.bfloat16):
            native = model(img)
            assert len(calls) == 4  # float32 and bf16 forwards, two cross-attentions each
            monkeypatch.setenv("PERCEIVERS_NATIVE", "0")
            products = model(img)
    assert len(calls) == 4
    scale = exact.abs().max()
    assert (native.float() - exact).abs().max() <= max(2e-2 * scale, (products.float() - exact).abs().max())


def test_videos_go_through_the_kernel(monkeypatch):
    torch.manual_seed(0)
    model = Perceiver(num_freq_bands=3, depth=2, max_freq=6.0, input_channels=3, input_axis=3, num_latents=8,
                      latent_dim=16, cross_dim_head=8, latent_dim_head=8, num_classes=4).eval()
    video = torch.randn(2, 4, 16, 20, 3)  # 1280 positions per sample: T·H = 64 grid rows of 20
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        native = model(video)
        assert len(calls) == 2
        model.chunk_size = 0
        whole = model(video)
    torch.testing.assert_close(native, whole, rtol=1e-5, atol=1e-6)
    model.chunk_size = None
    model.train()
    native_grads = _param_grads(model, lambda: model(video).pow(2).mean())
    assert len(calls) == 4
    monkeypatch.setenv("PERCEIVERS_NATIVE", "0")
    _assert_same_grads(native_grads, _param_grads(model, lambda: model(video).pow(2).mean()))


def test_small_images_go_through_the_kernel_too(monkeypatch):
    monkeypatch.setattr(ga, "MIN_PIXELS", 1)  # tiny images, the mechanism of the large ones
    torch.manual_seed(0)
    model = _readme_like()
    img = torch.randn(3, 9, 14, 3)
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        native = model(img)  # 126 elements: not streamed, but given to the kernel as one chunk
        assert len(calls) == 2
        model.chunk_size = 0
        torch.testing.assert_close(native, model(img), rtol=1e-5, atol=1e-6)
    assert len(calls) == 2


def test_perceiver_training_through_the_kernel(monkeypatch):
    monkeypatch.setattr(ga, "MIN_PIXELS", 1)  # tiny images, the mechanism of the large ones
    torch.manual_seed(0)
    model = _readme_like(cross_heads=2).train()
    img = torch.randn(2, 20, 14, 3)
    calls = _count_kernel_calls(monkeypatch)

    def loss():
        return model(img).pow(2).mean()

    for chunk_size in (None, 70):  # one chunk; streamed in chunks of 5 rows
        model.chunk_size = chunk_size
        native = _param_grads(model, loss)
        assert len(calls) == 2
        calls.clear()
        monkeypatch.setenv("PERCEIVERS_NATIVE", "0")
        plain = _param_grads(model, loss)  # the whole context (None) or the checkpointed online softmax (70)
        monkeypatch.delenv("PERCEIVERS_NATIVE")
        assert not calls
        _assert_same_grads(native, plain)


def test_images_below_min_pixels_keep_the_pytorch_path(monkeypatch):
    model = _readme_like()
    monkeypatch.setattr(ga, "grid_cross_attention", lambda *a, **k: pytest.fail("kernel used"))
    with torch.no_grad():
        model(torch.randn(2, 16, 16, 3))  # 256 < MIN_PIXELS: not worth a kernel call
    assert ga.MIN_PIXELS > 256


def test_image_gradients_dropout_and_masks_keep_the_pytorch_path(monkeypatch):
    monkeypatch.setattr(ga, "MIN_PIXELS", 1)
    model = _readme_like()
    img = torch.randn(1, 12, 12, 3)
    monkeypatch.setattr(ga, "grid_cross_attention", lambda *a, **k: pytest.fail("kernel used"))
    for chunk_size in (50, None):
        model.chunk_size = chunk_size
        model(img.clone().requires_grad_(True)).sum().backward()  # the image needs a gradient
        with torch.no_grad():
            model(img, mask=torch.rand(1, 12, 12) > 0.3)
    dropped = _readme_like(attn_dropout=0.1).train()
    dropped(img).sum().backward()


def test_unwritable_cache_falls_back(monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("PERCEIVERS_CACHE", str(blocked / "kernels"))
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.load("grid_attention") is None


def test_no_home_directory_falls_back(monkeypatch):
    """Without ``PERCEIVERS_CACHE`` and a home directory (a container run as a uid without a passwd entry),
    the kernels are not built and the models keep their PyTorch path."""
    monkeypatch.delenv("PERCEIVERS_CACHE", raising=False)
    monkeypatch.setattr(kernels, "_loaded", {})

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(kernels.Path, "home", staticmethod(no_home))
    assert kernels.load("grid_attention") is None
    with torch.no_grad():
        assert _readme_like()(torch.randn(1, 40, 40, 3)).isfinite().all()


def test_compiler_with_arguments_and_shared_cache(monkeypatch, tmp_path):
    """``CC`` may hold a command with arguments (``CC="ccache gcc"``); builds are readable by other users."""
    monkeypatch.setenv("PERCEIVERS_CACHE", str(tmp_path))
    compiler = kernels._compiler()
    assert compiler is not None
    monkeypatch.setenv("CC", f"env {compiler[0]}")
    assert kernels._compiler() == ["env", compiler[0]]
    path = kernels._build("transpose")
    assert path is not None and path.stat().st_mode & 0o777 == 0o755


def test_builds_are_keyed_by_processor(monkeypatch, tmp_path):
    """A cache shared by machines of two processor models holds a build for each (``-march=native``)."""
    monkeypatch.setenv("PERCEIVERS_CACHE", str(tmp_path))
    built = {}
    for cpu in ("model A: flags avx2", "model B: flags avx2 avx512f", "model A: flags avx2"):
        monkeypatch.setattr(kernels, "_cpu_identity", lambda cpu=cpu: cpu)
        path = kernels._build("transpose")
        assert path is not None and path.parent == tmp_path
        built.setdefault(cpu, set()).add((path, path.stat().st_mtime_ns))
    assert len(built) == 2 and all(len(entries) == 1 for entries in built.values())  # the same model: no rebuild
    assert len({path for entries in built.values() for path, _ in entries}) == 2
    assert kernels._cpu_identity()  # this machine's, whatever it is


def test_register_tiled_kernels_load_only_with_avx512(monkeypatch):
    """The attention kernel stays off without AVX-512 (built for AVX2 it is only as fast as SDPA); the GEGLU
    kernel loads with AVX2 and FMA, and stays off below (SSE2 builds are slower than PyTorch); the grid
    kernel loads everywhere."""
    from perceivers.layers import native_activation, native_attention

    for flags, avx512, avx2 in (("flags\t: fpu avx2 fma", False, True),
                                ("flags\t: fpu avx2 fma avx512f avx512bw", True, True),
                                ("flags\t: fpu sse2 avx", False, False), ("flags\t: fpu avx2", False, False),
                                ("Features\t: fp asimd", False, False)):
        monkeypatch.setattr(kernels, "_cpu_identity", lambda flags=flags: "vendor_id\t: x\n" + flags)
        assert kernels.has_avx512.__wrapped__() is avx512 and kernels.has_avx2.__wrapped__() is avx2
    with pytest.raises(ValueError, match="isa must be"):
        kernels.load("attention", isa="avx512f")
    monkeypatch.setattr(kernels, "has_avx512", lambda: False)
    assert kernels.load("attention", isa="avx512") is None and kernels.load("grid_attention") is not None
    assert not native_attention.available()
    assert native_activation.available() is kernels.has_avx2()  # the host's own AVX2
    monkeypatch.setattr(kernels, "has_avx2", lambda: False)
    assert kernels.load("activations", isa="avx2") is None and not native_activation.available()

    def kernel_called(*args):
        raise AssertionError("the native attention kernel ran without AVX-512")

    monkeypatch.setattr(native_attention._NativeAttention, "apply", kernel_called)
    attn = Attention(32, 32, num_heads=2, qk_channels=32, v_channels=32).eval()
    q, kv = torch.randn(2, 8, 32), torch.randn(2, 40, 32)
    with torch.no_grad():
        assert attn(q, kv).isfinite().all()  # SDPA's path (32-wide heads would take the kernel otherwise)


def test_no_compiler_falls_back(no_compiler, monkeypatch):
    assert kernels.load("grid_attention") is None
    model = _readme_like()
    img = torch.randn(1, 12, 12, 3)
    with torch.no_grad():
        model.chunk_size = 50
        streamed = model(img)
        model.chunk_size = 0
        torch.testing.assert_close(streamed, model(img), rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("PERCEIVERS_NATIVE", "0")
    assert not kernels.enabled()


def test_deepmind_image_stream_uses_the_kernel(monkeypatch):
    monkeypatch.setattr(ga, "MIN_PIXELS", 1)  # tiny images, the mechanism of the large ones
    import perceivers

    torch.manual_seed(0)
    model = perceivers.create_model("vision-perceiver-fourier", tiny=True, chunk_size=0).eval()
    x = torch.randn(2, 3, 12, 10)
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        whole = model(x).logits
        model.perceiver.chunk_size = 30
        streamed = model(x).logits
        assert len(calls) == 1
        model.perceiver.chunk_size = None  # too small to stream: one chunk, for the kernel
        automatic = model(x).logits
        assert len(calls) == 2
        model.perceiver(x, input_mask=torch.rand(2, 120) > 0.5)  # a key mask: the PyTorch path
    assert len(calls) == 2
    torch.testing.assert_close(streamed, whole, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(automatic, whole, rtol=1e-4, atol=2e-5)


def test_deepmind_image_training_through_the_kernel(monkeypatch):
    monkeypatch.setattr(ga, "MIN_PIXELS", 1)  # tiny images, the mechanism of the large ones
    import perceivers

    torch.manual_seed(0)
    model = perceivers.create_model("vision-perceiver-fourier", tiny=True).train()
    x = torch.randn(2, 3, 12, 10)
    calls = _count_kernel_calls(monkeypatch)

    def loss():
        return model(x).logits.pow(2).mean()

    native = _param_grads(model, loss)
    assert len(calls) == 1
    monkeypatch.setenv("PERCEIVERS_NATIVE", "0")
    plain = _param_grads(model, loss)
    assert len(calls) == 1
    _assert_same_grads(native, plain)


def _op_args(requires_grad: bool):
    """The forward operator's arguments for a small problem: folded queries ``[B, H, Q, C]``, γ, β, the grid."""
    attn, norm, x, grid, _ = _problem(3, 9, 11)
    q = attn.to_q(x).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
    qf = attn._fold_queries(q).detach().requires_grad_(requires_grad)
    gamma, beta = (p.detach().clone().requires_grad_(requires_grad) for p in (norm.weight, norm.bias))
    return qf, gamma, beta, grid.data, *grid.tables, 1e-5, 3 * 11 * 2  # chunks of 3 image rows


@pytest.mark.parametrize("requires_grad", [False, True])
def test_operators_pass_opcheck(requires_grad):
    """The ``perceivers::grid_attention`` operators that ``torch.compile`` keeps: schema, fake tensors (shapes
    for tracing), autograd registration and AOT dispatch, checked by ``torch.library.opcheck``."""
    args = _op_args(requires_grad)
    torch.library.opcheck(ga._grid_op, args)
    qf, gamma, _, data, t_h, t_w, eps, chunk = args
    with torch.no_grad():
        _, mean, lse = ga._grid_op(*args)
    torch.library.opcheck(ga._grid_backward_op, (torch.randn_like(qf), qf.detach(), gamma.detach(), mean, lse, data,
                                                 t_h, t_w, eps, chunk, True, True, False))


def test_operators_give_the_autograd_functions_results():
    """Operator and eager autograd function: the same output and gradients, bit for bit (one computation)."""
    qf, gamma, beta, data, t_h, t_w, eps, chunk = _op_args(True)
    upstream = torch.randn(qf.shape)
    results = []
    for fn in (lambda: ga._grid_op(qf, gamma, beta, data, t_h, t_w, eps, chunk)[0],
               lambda: ga._GridAttention.apply(qf, gamma, beta, GridContext(data, (9, 11), (t_h, t_w)), eps, chunk)):
        out = fn()
        results.append((out, *torch.autograd.grad((out * upstream).sum(), (qf, gamma, beta))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True])
def test_compiled_models_keep_the_kernel(monkeypatch, train):
    """Under ``torch.compile(fullgraph=True)`` a Perceiver's image goes through the kernel as operators, forward and
    backward (traced, the stream's chunks were unrolled into the graph and attended by the PyTorch path): outputs
    and gradients equal eager mode's."""
    monkeypatch.setattr(ga, "MIN_PIXELS", 1)  # tiny images, the mechanism of the large ones
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        real = getattr(ga, f"_{name}")
        monkeypatch.setattr(ga, f"_{name}", lambda *a, _real=real, _name=name, **k: calls.__setitem__(
            _name, calls[_name] + 1) or _real(*a, **k))
    torch.manual_seed(0)
    model = _readme_like(cross_heads=2).train(train)
    img = torch.randn(2, 20, 14, 3)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(train):
        want = model(img)
        eager = dict(calls)
        got = compiled(img)
        assert calls["forward"] - eager["forward"] == eager["forward"] == 2  # both cross-attentions
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if train:
            params = list(model.parameters())
            grads = torch.autograd.grad(want.square().sum(), params)
            assert calls["backward"] == 2
            torch.testing.assert_close(torch.autograd.grad(got.square().sum(), params), grads, rtol=1e-4, atol=1e-6)
            assert calls["backward"] == 4
    torch._dynamo.reset()


@pytest.mark.parametrize("requires_grad", [False, True])
def test_operators_without_the_kernel_compute_the_same_in_pytorch(monkeypatch, requires_grad):
    """Where the kernel is not served (a program exported with the operator, run with the kernel off, not built or on
    another device), the operators compute the same output, statistics and gradients in PyTorch operations, and
    pass ``opcheck`` that way too."""
    qf, gamma, beta, data, t_h, t_w, eps, chunk = args = _op_args(True)
    upstream = torch.randn(qf.shape)
    results = []
    for served in (True, False):
        monkeypatch.setattr(ga, "available", lambda served=served: served)
        out, mean, lse = ga._grid_op(*args)
        results.append((out, mean, lse, *torch.autograd.grad((out * upstream).sum(), (qf, gamma, beta))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(ga._grid_op, _op_args(requires_grad))
    with torch.no_grad():
        _, mean, lse = ga._grid_op(*args)
    torch.library.opcheck(ga._grid_backward_op, (upstream, qf.detach(), gamma.detach(), mean, lse, data, t_h, t_w,
                                                 eps, chunk, True, False, True))
