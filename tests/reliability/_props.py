"""The properties the fuzzers check, as plain functions of a hypothesis ``data`` object.

Used by ``test_properties.py`` (short CI profile and the long ``fuzz`` profile) and by
``scripts/reliability_report.py``, which reads :data:`COUNTS` — how many generated inputs each
property was checked on.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from _zoo import KINDS, MASKED_KINDS, SET_KINDS, Case, beyond_float16, draw_case
from hypothesis import strategies as st
from torch import Tensor

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALES = [1.0, 1e4, 1e-4]
COUNTS: Counter[str] = Counter()
PER_MODEL: Counter[tuple[str, str]] = Counter()  # (property, model class or registry name) → examples


def _count(prop: str, case: Case) -> None:
    COUNTS[prop] += 1
    PER_MODEL[(prop, case.name)] += 1


def _gen(data) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="input seed"))


def _draw_inputs(data, case: Case, min_batch: int = 1, max_batch: int = 3) -> dict[str, Tensor]:
    batch = data.draw(st.integers(min_batch, max_batch), label="batch")
    return case.make(data.draw, batch, _gen(data))


def _with_grads(case: Case, inputs: dict[str, Tensor]):
    """Output, gradient w.r.t. the data (if floating) and every parameter gradient, for a fixed random cotangent."""
    model = case.model
    model.zero_grad(set_to_none=True)
    inputs = dict(inputs)
    if case.float_data:
        inputs[case.data_key] = inputs[case.data_key].clone().requires_grad_()
    out = case.run(model, inputs)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype)
    (out.float() * cot.float()).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    data_grad = inputs[case.data_key].grad if case.float_data else None
    return out.detach(), data_grad, grads


def _scramble(case: Case, inputs: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Replace every masked-out element of the data by large unrelated values (or other token ids)."""
    data, mask = inputs[case.data_key], inputs[case.mask_key]
    gen = torch.Generator().manual_seed(seed)
    if case.float_data:
        other = 100 * torch.randn(data.shape, generator=gen, dtype=data.dtype)
        keep = mask.reshape(*mask.shape, *([1] * (data.ndim - mask.ndim)))
    else:
        other = torch.randint(0, int(data.max()) + 2, data.shape, generator=gen)
        other = other.clamp(max=_vocab(case) - 1)
        keep = mask
    return {**inputs, case.data_key: torch.where(keep, data, other)}


def _vocab(case: Case) -> int:
    c = case.config
    if "num_tokens" in c:
        return c["num_tokens"]
    return case.model.config.vocab_size


def _close(a: Tensor, b: Tensor, *, tol: float, msg: str = "") -> None:
    torch.testing.assert_close(a, b, atol=tol * (1 + float(b.abs().max()) if b.numel() else tol), rtol=tol, msg=msg)


# ---------------------------------------------------------------------------------------------------- properties


def finite_with_shape(data, kind: str) -> None:
    """Outputs are finite, ``[B, ...]``, and so is every gradient."""
    case = draw_case(data, [kind])
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    scale = data.draw(st.sampled_from(SCALES), label="input scale")
    inputs = _draw_inputs(data, case)
    batch = next(v for k, v in inputs.items() if k not in case.shared).shape[0]
    case.model.to(dtype)
    inputs = {k: (v * scale).to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    out, dgrad, grads = _with_grads(case, inputs)
    assert out.shape[0] == batch, (case.name, out.shape)
    assert out.dtype == dtype, (case.name, out.dtype)
    if not torch.isfinite(out).all() and beyond_float16(case, inputs, dtype):
        COUNTS["finite: skipped, exact activations beyond float16 range"] += 1
        return
    assert torch.isfinite(out).all(), (case.name, dtype, scale)
    assert dgrad is None or torch.isfinite(dgrad).all(), case.name
    bad = [k for k, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, (case.name, dtype, scale, bad)
    _count("finite outputs and gradients, documented shape", case)
    COUNTS[f"finite: {dtype} x{scale:g}"] += 1


def masked_inputs_have_no_influence(data, kind: str) -> None:
    """Masked-out inputs change neither the outputs nor any gradient; their own gradient is exactly 0."""
    case = draw_case(data, [kind])
    assert case.mask_key is not None
    inputs = _draw_inputs(data, case)
    mask = inputs[case.mask_key]
    other = _scramble(case, inputs, data.draw(st.integers(0, 2**16), label="scramble seed"))
    out_a, dgrad_a, grads_a = _with_grads(case, inputs)
    out_b, dgrad_b, grads_b = _with_grads(case, other)
    if case.outputs_follow_mask:  # a masked token's own output row is built from it (PerceiverLM)
        out_a, out_b = out_a[mask], out_b[mask]
    _close(out_b, out_a, tol=1e-5, msg=f"{case.name}: outputs changed")
    if not case.outputs_follow_mask:
        assert grads_a.keys() == grads_b.keys()
        for key in grads_a:
            _close(grads_b[key], grads_a[key], tol=1e-4, msg=f"{case.name}: gradient of {key} changed")
    if dgrad_a is not None:
        keep = mask.reshape(*mask.shape, *([1] * (dgrad_a.ndim - mask.ndim))).expand_as(dgrad_a)
        assert torch.all(dgrad_a[~keep] == 0) and torch.all(dgrad_b[~keep] == 0), case.name
        _close(dgrad_b[keep], dgrad_a[keep], tol=1e-4, msg=f"{case.name}: input gradient changed")
    _count("masked inputs: no influence on outputs or gradients", case)


def _rounding(case: Case, inputs: dict[str, Tensor], out32: Tensor) -> float:
    """The model's own float32 rounding on these inputs: its distance to the float64 model, relative as in
    :func:`_close`. Two float32 computations of the same result (batched or not, permuted) may differ by
    about twice this; it is tiny unless the model is ill-conditioned (a LayerNorm over 2 channels of
    nearly equal values)."""
    out64 = _float64_output(case, inputs)
    return float((out32.double() - out64).abs().max()) / (1 + float(out64.abs().max())) if out64.numel() else 0.0


def _float64_output(case: Case, inputs: dict[str, Tensor]) -> Tensor:
    """The output of a float64 copy of the model on the inputs cast to float64."""
    with torch.no_grad():
        model64 = copy.deepcopy(case.model).double()
        return case.run(model64, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})


def samples_are_independent(data, kind: str) -> None:
    """Each sample's output is the same alone as in the batch (to 1e-5, or twice the model's own float32
    rounding where that is larger)."""
    case = draw_case(data, [kind])
    inputs = _draw_inputs(data, case, min_batch=2, max_batch=4)
    batch = next(v for k, v in inputs.items() if k not in case.shared).shape[0]
    with torch.no_grad():
        together = case.run(case.model, inputs)
        tol = max(1e-5, 2 * _rounding(case, inputs, together))
        for i in range(batch):
            alone = case.run(case.model, {k: v if k in case.shared else v[i: i + 1] for k, v in inputs.items()})
            _close(together[i: i + 1], alone, tol=tol, msg=f"{case.name}: sample {i} depends on the batch")
    _count("batch independence", case)


def permutation_invariant_without_positions(data, kind: str) -> None:
    """Models without position features treat their inputs as a set (masks permuted along)."""
    case = draw_case(data, [kind], overrides={"fourier_encode_data": False})
    if not case.set_input:
        return  # drew position features: nothing to check (hypothesis still counts the example)
    inputs = _draw_inputs(data, case)
    x, mask = inputs[case.data_key], inputs[case.mask_key]
    b = x.shape[0]
    flat_x = x.reshape(b, -1, x.shape[-1])
    n = flat_x.shape[1]
    perm = torch.randperm(n, generator=_gen(data))
    permuted = {**inputs, case.data_key: flat_x[:, perm].reshape(x.shape),
                case.mask_key: mask.reshape(b, n)[:, perm].reshape(mask.shape)}
    with torch.no_grad():
        out = case.run(case.model, inputs)
        _close(case.run(case.model, permuted), out, tol=max(1e-5, 2 * _rounding(case, inputs, out)),
               msg=f"{case.name}: order of the inputs matters")
    _count("permutation invariance without positions", case)


def float32_matches_float64(data, kind: str) -> None:
    """The same model and inputs in float64 agree with float32 within float32 rounding."""
    case = draw_case(data, [kind])
    inputs = _draw_inputs(data, case)
    with torch.no_grad():
        out32 = case.run(case.model, inputs)
    out64 = _float64_output(case, inputs)
    assert out64.dtype == torch.float64, case.name
    _close(out32.double(), out64, tol=2e-4, msg=f"{case.name}: float32 and float64 disagree")
    _count("float32 vs float64", case)


def chunked_decoding_matches_full(data, kind: str = "registry") -> None:
    """The multimodal model decoded chunk by chunk (the official subsampling) equals one full decode."""
    from _zoo import registry

    case = registry("multimodal-perceiver", seed=data.draw(st.integers(0, 2**16), label="seed"))
    model, c = case.model, case.model.config
    inputs = _draw_inputs(data, case, max_batch=2)
    sizes = c.output_sizes
    divisors = [k for k in range(1, sizes["audio"] + 1) if sizes["audio"] % k == 0 and sizes["image"] % k == 0]
    chunks = data.draw(st.sampled_from(divisors), label="chunks")
    raw = {"image": inputs["data"], "audio": inputs["audio"]}
    with torch.no_grad():
        full = model(raw).logits
        parts = model.reconstruct(raw, num_chunks=chunks)
    _close(parts["image"].flatten(1, 3), full["image"], tol=1e-5, msg="image chunks")
    _close(parts["audio"], full["audio"], tol=1e-5, msg="audio chunks")
    _close(parts["label"], full["label"], tol=1e-5, msg="label")
    # any subset of points decodes to the matching rows of the full output
    pts = data.draw(st.lists(st.integers(0, sizes["image"] - 1), min_size=1, max_size=8, unique=True), label="points")
    with torch.no_grad():
        sub = model(raw, {"image": torch.tensor(pts)}).logits
    _close(sub["image"], full["image"][:, pts], tol=1e-5, msg="subsampled points")
    _count("chunked vs full decoding (multimodal)", case)


def _set_chunking(model, size: int, fold: bool | None) -> None:
    """Chunk sizes on the model (0 = never stream) and the fold choice on every attention."""
    from perceivers.layers import Attention

    for attr in ("chunk_size", "decode_chunk_size"):
        if hasattr(model, attr):
            setattr(model, attr, size)
    for mod in model.modules():
        if isinstance(mod, Attention):
            mod.fold_kv = fold


def chunked_attention_matches_full(data, kind: str) -> None:
    """Streaming the cross-attention in chunks (online softmax) and attending in the context's own space
    (folded projections) give the outputs and gradients of the plain computation — also with fully masked
    samples and chunks — and stay finite in bfloat16/float16."""
    case = draw_case(data, [kind], overrides={"inverted_cross_attn": False})
    inputs = _draw_inputs(data, case)
    size = data.draw(st.integers(1, 4), label="chunk size")
    fold = data.draw(st.sampled_from([None, True, False]), label="fold_kv")
    _set_chunking(case.model, 0, False)
    out_a, dgrad_a, grads_a = _with_grads(case, inputs)
    _set_chunking(case.model, size, fold)
    out_b, dgrad_b, grads_b = _with_grads(case, inputs)
    _close(out_b, out_a, tol=1e-5, msg=f"{case.name}: chunked output differs")
    for key in grads_a:
        _close(grads_b[key], grads_a[key], tol=1e-4, msg=f"{case.name}: chunked gradient of {key} differs")
    _close(dgrad_b, dgrad_a, tol=1e-4, msg=f"{case.name}: chunked input gradient differs")
    dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float16]), label="low precision")
    case.model.to(dtype)
    low = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    out_c, dgrad_c, grads_c = _with_grads(case, low)
    assert torch.isfinite(out_c).all() and torch.isfinite(dgrad_c).all(), (case.name, dtype)
    assert all(torch.isfinite(g).all() for g in grads_c.values()), (case.name, dtype)
    _count("chunked vs unchunked attention (+ folded projections)", case)


def per_sample_gradients_with_torch_func(data, kind: str) -> None:
    """``torch.func``: per-sample parameter gradients (``vmap(grad(loss))`` over the batch, with
    ``functional_call``) equal each sample's own backward pass, the native and oneDNN kernels (which define no
    batching rule) and the value checks (which cannot read batched values) giving way to operators that vmap."""
    from torch.func import functional_call, grad, vmap

    case = draw_case(data, [kind])
    inputs = _draw_inputs(data, case, min_batch=2, max_batch=3)
    model = case.model
    params = {k: p.detach() for k, p in model.named_parameters()}
    batched = {k: v for k, v in inputs.items() if k not in case.shared and v is not None}
    shared = {k: v for k, v in inputs.items() if k not in batched}
    cot = torch.randn(case.run(model, inputs).shape, generator=torch.Generator().manual_seed(0))

    def loss(params, sample, c):
        out = case.run(lambda *args, **kwargs: functional_call(model, params, args, kwargs),
                       {**shared, **{k: v[None] for k, v in sample.items()}})
        return (out.float() * c[None]).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0), randomness="different")(params, batched, cot)
    for i in range(cot.shape[0]):
        model.zero_grad(set_to_none=True)
        one = {**shared, **{k: v[i: i + 1] for k, v in batched.items()}}
        (case.run(model, one).float() * cot[i: i + 1]).sum().backward()
        for key, p in model.named_parameters():
            want = torch.zeros_like(p) if p.grad is None else p.grad
            _close(per_sample[key][i], want, tol=1e-4, msg=f"{case.name}: per-sample gradient of {key}, sample {i}")
    _count("per-sample gradients (torch.func)", case)


PROPERTIES = {
    "finite": finite_with_shape,
    "masks": masked_inputs_have_no_influence,
    "batch": samples_are_independent,
    "permutation": permutation_invariant_without_positions,
    "float64": float32_matches_float64,
    "chunked_decoding": chunked_decoding_matches_full,
    "chunked_attention": chunked_attention_matches_full,
    "per_sample_gradients": per_sample_gradients_with_torch_func,
}
# property → the model kinds (see _zoo.CONFIGS) it is checked on
KINDS_OF = {
    "finite": KINDS,
    "masks": MASKED_KINDS,
    "batch": KINDS,
    "permutation": SET_KINDS,
    "float64": KINDS,
    "chunked_decoding": ["registry"],
    "chunked_attention": ["perceiver", "perceiver_io"],
    "per_sample_gradients": KINDS,
}
PAIRS = [(prop, kind) for prop in sorted(PROPERTIES) for kind in KINDS_OF[prop]]
