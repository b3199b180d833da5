"""The models on a CUDA device: the references' outputs there too, bf16 autocast, compile, bounded memory.

Skipped where there is no CUDA device (CI has none). On a GPU machine: ``pytest tests/parity/test_cuda.py``.
Every comparison runs both sides on the GPU in float32 with TF32 off, at the tolerances of the CPU parity
tests: DeepMind's official outputs (tests/data/haiku), transformers and perceiver-pytorch.
"""

from __future__ import annotations

import pytest
import torch

import perceivers
from perceivers.convert import from_lucidrains

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")
GiB = 2**30

# perceiver-pytorch's README Perceiver (its classifier), the model of the input-size sweep
README = {"input_channels": 3, "input_axis": 2, "num_freq_bands": 6, "max_freq": 10.0, "depth": 2, "num_latents": 256,
              "latent_dim": 512, "cross_heads": 1, "latent_heads": 8, "cross_dim_head": 64, "latent_dim_head": 64,
              "num_classes": 1000, "attn_dropout": 0.0, "ff_dropout": 0.0, "weight_tie_layers": False,
              "fourier_encode_data": True, "self_per_cross_attn": 2}


@pytest.fixture(autouse=True)
def _float32_products():
    """Products in float32 (no TF32), as on the CPU; restored after each test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _to(x, device):
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _cpu(x):
    return {k: _cpu(v) for k, v in x.items()} if isinstance(x, dict) else x.detach().float().cpu()


# ------------------------------------------------------------------------------- DeepMind's official outputs


@pytest.mark.parametrize("task,variant", [("imagenet_fourier", "vision-perceiver-fourier"),
                                          ("imagenet_conv", "vision-perceiver-conv"),
                                          ("imagenet_learned", "vision-perceiver-learned")])
def test_haiku_vectors_imagenet(task, variant):
    from test_haiku_vectors import _check, _imagenet_model, _io, _nchw

    model, data = _imagenet_model(task, variant).to(CUDA), _io(task)
    with torch.no_grad():
        _check(f"{task}/logits on CUDA", model(_nchw(data["images"]).to(CUDA)).logits.cpu(), data["logits"])


def test_haiku_vectors_language_flow_multimodal():
    from test_haiku_vectors import _check, _flow_model, _io, _multimodal_model, _nchw

    flow, data = _flow_model().to(CUDA), _io("optical_flow")
    with torch.no_grad():
        _check("optical_flow/flow on CUDA", flow(_nchw(data["images"]).to(CUDA)).flow.cpu(), data["flow"])
    mm, data = _multimodal_model().to(CUDA), _io("multimodal_autoencoding")
    inputs = _to({"image": _nchw(data["images"]), "audio": torch.from_numpy(data["audio"]),
                  "label": torch.from_numpy(data["label_input"])}, CUDA)
    points = _to({m: torch.from_numpy(data[f"subsampling_chunk_{m}"]) for m in ("image", "audio")}, CUDA)
    with torch.no_grad():
        out = mm(inputs, subsampled_output_points=points).logits
    for m in ("image", "audio", "label"):
        _check(f"multimodal/chunk_{m} on CUDA", out[m].cpu(), data[f"chunk_{m}"])


def test_haiku_vectors_masked_language_model():
    from test_haiku_vectors import _check, _io, _mlm_model

    model, data = _mlm_model().to(CUDA), _io("mlm")
    ids, mask = torch.from_numpy(data["inputs"]), torch.from_numpy(data["input_mask"])
    with torch.no_grad():
        logits = model(ids.to(CUDA), attention_mask=mask.to(CUDA)).logits.cpu()
    _check("mlm/logits on CUDA", logits, data["logits"])


# ------------------------------------------------------------------------------------------- transformers


def test_transformers_heads_on_cuda(tmp_path_factory):
    pytest.importorskip("transformers")
    from _transformers_models import CONFIGS, checkpoint_factory
    from _transformers_models import inputs as make_inputs
    from test_transformers import _max_error, _run_hf, _run_ours

    from perceivers.convert.transformers import from_transformers

    make = checkpoint_factory(tmp_path_factory, CONFIGS)
    for arch in CONFIGS:
        hf, directory = make(arch)
        ours = from_transformers(directory, numerics="transformers").to(CUDA)
        inputs = _to(make_inputs(arch), CUDA)
        if arch == "PerceiverForMultimodalAutoencoding":  # _run_* index with CPU ranges; the models take them as given
            got = ours(inputs["inputs"], subsampled_output_points=_to(
                {"image": torch.arange(64, 128), "audio": torch.arange(2, 4)}, CUDA)).logits
            want = hf.to(CUDA)(inputs=inputs["inputs"], subsampled_output_points=_to(
                {"image": torch.arange(64, 128), "audio": torch.arange(2, 4), "label": None}, CUDA)).logits
        else:
            got, want = _run_ours(ours, arch, inputs), _run_hf(hf.to(CUDA), arch, inputs)
        err = _max_error(_cpu(got), _cpu(want))
        hf.cpu()
        assert err < 2e-5, f"{arch} on CUDA: max |ours - transformers| = {err:.3g}"


# --------------------------------------------------------------------------------------- perceiver-pytorch


def _lucidrains_pair(randomize, cls: str, **kwargs):
    ref = pytest.importorskip("perceiver_pytorch")
    theirs = randomize(getattr(ref, cls)(**kwargs)).to(CUDA).eval()
    ours = getattr(perceivers, cls)(**kwargs)
    ours.load_state_dict(from_lucidrains(theirs.state_dict()), strict=True)
    return theirs, ours.to(CUDA).eval()


def test_lucidrains_perceiver_outputs_and_gradients_on_cuda(randomize):
    kwargs = dict(README, depth=3, num_latents=16, latent_dim=64, num_classes=10)
    theirs, ours = _lucidrains_pair(randomize, "Perceiver", **kwargs)
    x = torch.randn(2, 24, 20, 3, device=CUDA)
    outs, grads = [], []
    for model in (theirs, ours):
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append(xi.grad)
    scale = max(1.0, float(outs[0].abs().max()))
    assert float((outs[0] - outs[1]).abs().max()) <= 2e-5 * scale
    assert float((grads[0] - grads[1]).abs().max()) <= 2e-5 * max(1.0, float(grads[0].abs().max()))


def test_lucidrains_perceiver_io_on_cuda(randomize):
    kwargs = {"dim": 32, "queries_dim": 24, "logits_dim": 7, "depth": 2, "num_latents": 16, "latent_dim": 64,
                  "cross_heads": 1, "latent_heads": 4, "cross_dim_head": 16, "latent_dim_head": 16}
    theirs, ours = _lucidrains_pair(randomize, "PerceiverIO", **kwargs)
    data, queries = torch.randn(2, 300, 32, device=CUDA), torch.randn(2, 50, 24, device=CUDA)
    mask = torch.rand(2, 300, device=CUDA) > 0.3
    with torch.no_grad():
        want, got = theirs(data, mask=mask, queries=queries), ours(data, mask=mask, queries=queries)
    assert float((want - got).abs().max()) <= 2e-5 * max(1.0, float(want.abs().max()))


# ----------------------------------------------------------------------------- bf16, compile, large inputs


def test_bf16_autocast_training_step_follows_float32():
    model = perceivers.Perceiver(**dict(README, num_classes=10)).to(CUDA)
    x = torch.randn(4, 32, 32, 3, device=CUDA)
    with torch.no_grad():
        want = model(x)
    with torch.autocast(CUDA.type, dtype=torch.bfloat16):
        got = model(x)
    assert got.dtype == torch.bfloat16
    rel = float((got.float() - want).norm() / want.norm())
    assert rel < 3e-2, f"bf16 autocast logits: relative error {rel:.3g} against float32"
    got.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_compile_fullgraph_on_cuda_matches_eager():
    model = perceivers.Perceiver(**dict(README, num_classes=10)).to(CUDA).eval()
    x = torch.randn(2, 48, 40, 3, device=CUDA)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("side,limit_gib", [(1024, 0.5), (4096, 2.0)])
def test_large_image_forward_memory_is_bounded_on_cuda(side, limit_gib):
    """The issue's memory targets, on the GPU: 1024² (1M inputs) in ≤ 0.5 GiB, 4096² (16.8M) in ≤ 2 GiB."""
    model = perceivers.Perceiver(**README).to(CUDA).eval()
    x = torch.rand(1, side, side, 3, device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = model(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert peak <= limit_gib * GiB, f"{side}²: {peak / GiB:.2f} GiB above the model and input, limit {limit_gib} GiB"


# ------------------------------------------------------------------------ heads wider than the fused kernels


def test_wide_heads_train_through_grouped_products_as_through_sdpa(monkeypatch):
    """The official vision model's folded cross-attention (RGB + 64 Fourier bands: 261 channels, one head) is
    wider than flash and cuDNN take; trained, it runs as grouped products with SDPA's gradients."""
    from perceivers import create_model
    from perceivers.layers import wide_attention

    model = create_model("vision-perceiver-fourier", image_size=(32, 32), num_bands=64, num_latents=16,
                         d_latents=64, num_blocks=1, num_self_attends_per_block=1, num_labels=10).to(CUDA)
    x = torch.randn(3, 3, 32, 32, device=CUDA)
    calls = []
    attend = wide_attention.attend
    monkeypatch.setattr(wide_attention, "attend", lambda *a, **k: calls.append(a[0].shape) or attend(*a, **k))

    def grads():
        model.zero_grad()
        loss = model(x).logits.pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, got = grads()
    assert calls and calls[0][-1] > wide_attention.MAX_FUSED_WIDTH, calls
    monkeypatch.setattr(wide_attention, "applies", lambda *a: False)
    want_loss, want = grads()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    # absolute tolerance on the scale of the largest gradient: some are zero up to rounding (a key bias)
    atol = 1e-5 * max(float(g.abs().max()) for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    with torch.autocast("cuda", dtype=torch.bfloat16):  # bf16: the same loss within bf16 rounding
        bf16 = model(x).logits.float().pow(2).mean()
    assert abs(float(bf16) - float(want_loss)) <= 3e-2 * float(want_loss)


@pytest.mark.parametrize(("fold", "batch"), [(True, 16), (False, 16), (True, 1)])
def test_streamed_inference_through_the_fused_kernel_matches_attending_at_once(fold, batch):
    """Inputs streamed in chunks go through CUDA's memory-efficient kernel chunk by chunk, merged by their
    log-sum-exps, as attending the whole input at once (folded into the input's space, or projected). With fewer
    query rows than CUDA_FUSED_MIN_ROWS (one image's 256 latents) the online softmax streams them instead."""
    from perceivers.layers import attention

    model = perceivers.Perceiver(**dict(README, num_classes=10)).to(CUDA).eval()
    for block in model.blocks:
        block.cross_attn.attn.fold_kv = fold
    x = torch.randn(batch, 96, 80, 3, device=CUDA)
    with torch.no_grad():
        model.chunk_size = 0
        want = model(x)
        model.chunk_size = 1000
        calls = []
        kernel = attention._attention_lse
        attention._attention_lse = lambda *a: calls.append(a[0].shape) or kernel(*a)
        try:
            got = model(x)
        finally:
            attention._attention_lse = kernel
    fused = batch * README["num_latents"] >= attention.CUDA_FUSED_MIN_ROWS
    assert len(calls) == (2 * 8 if fused else 0), calls  # two cross-attentions, 7680 inputs in chunks of 1000
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
