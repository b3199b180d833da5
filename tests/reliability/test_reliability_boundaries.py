"""Bad input at every public boundary raises ValueError/TypeError naming what was expected and what came.

Covers the official registry models, the perceiver-pytorch family, the Perceiver IO building blocks,
processors, the tokenizer, batching helpers and the NaN/Inf policy; loaders are in
``test_reliability_files.py``. Each case lists regex fragments that must all appear in the message.
"""

from __future__ import annotations

import re

import pytest
import torch

from perceivers import (
    GatedPerceiver,
    InputModality,
    MultiModalityPerceiver,
    Perceiver,
    PerceiverIO,
    PerceiverLM,
    create_model,
    pad_grid_batch,
    pad_point_batch,
)
from perceivers.data import ByteTokenizer
from perceivers.io import BasicDecoder, PerceiverEncoder, PerceiverIOModel, TrainableQueries
from perceivers.io.processors import (
    AudioPreprocessor,
    ImagePreprocessor,
    MultimodalPreprocessor,
    OneHotPreprocessor,
)
from perceivers.validation import finite_checks, finite_checks_enabled, set_finite_checks

B = torch.bool
NAN = float("nan")
INF = float("inf")


def _full(shape, value, dtype=torch.float32):
    return torch.full(shape, value, dtype=dtype)


@pytest.fixture(scope="module")
def m():
    return build_models()


def build_models() -> dict:
    """One small instance of every public entry point the cases call (also used by the report script)."""
    torch.manual_seed(0)
    fam = {"num_latents": 4, "latent_dim": 16, "latent_heads": 2, "cross_dim_head": 8, "latent_dim_head": 8,
           "num_classes": 3}
    enc = PerceiverEncoder(5, num_latents=3, latent_channels=8, num_self_attends_per_block=1, num_self_attention_heads=1)
    return {
        "fourier": create_model("vision-perceiver-fourier", tiny=True).eval(),  # [B, 3, 12, 10]
        "conv": create_model("vision-perceiver-conv", tiny=True).eval(),  # [B, 3, 16, 20]
        "learned": create_model("vision-perceiver-learned", tiny=True).eval(),  # [B, 3, 6, 5]
        "mlm": create_model("language-perceiver", tiny=True).eval(),  # ids [B, <= 16]
        "cls": create_model("language-perceiver-classifier", tiny=True).eval(),
        "flow": create_model("optical-flow-perceiver", tiny=True).eval(),  # [B, 2, 3, 6, 8]
        "mm": create_model("multimodal-perceiver", tiny=True).eval(),  # image [B, 2, 3, 8, 8], audio [B, 32]
        "perceiver": Perceiver(num_freq_bands=2, depth=1, max_freq=6.0, input_channels=3, input_axis=2, **fam),
        "io": PerceiverIO(depth=1, dim=6, queries_dim=8, logits_dim=3,
                          **{k: v for k, v in fam.items() if k != "num_classes"}),
        "lm": PerceiverLM(num_tokens=11, dim=8, max_seq_len=8, depth=1,
                          **{k: v for k, v in fam.items() if k != "num_classes"}),
        "gated": GatedPerceiver(num_freq_bands=2, depth=1, max_freq=6.0, input_channels=3, input_axis=1, **fam),
        "multi": MultiModalityPerceiver(modalities=[InputModality("a", 3, 1, 2, 6.0)], depth=1,
                                        **{k: v for k, v in fam.items() if k != "num_classes"}),
        "iomodel": PerceiverIOModel(enc, BasicDecoder(TrainableQueries(2, 4), latent_channels=8)),
        "tok": ByteTokenizer(8),
    }


IMG = (2, 3, 12, 10)
MM_OK = {"image": torch.rand(1, 2, 3, 8, 8), "audio": torch.rand(1, 32)}
CASES = {
    # ---- official registry models (the forward of create_model(...))
    "vision/list": ("fourier", lambda m: m([[0.0]]), TypeError, ["torch.Tensor", "list"]),
    "vision/int": ("fourier", lambda m: m(torch.zeros(IMG, dtype=torch.long)), TypeError, ["floating", "int64"]),
    "vision/rank": ("fourier", lambda m: m(torch.zeros(3, 12, 10)), ValueError, ["batch, channels", r"\(3, 12, 10\)"]),
    "vision/nhwc": ("fourier", lambda m: m(torch.zeros(2, 12, 10, 3)), ValueError, ["3 input channels", r"\(2, 12, 10, 3\)"]),
    "vision/empty": ("fourier", lambda m: m(torch.zeros(2, 3, 0, 10)), ValueError, ["empty", r"\(2, 3, 0, 10\)"]),
    "vision/empty_batch": ("fourier", lambda m: m(torch.zeros(0, 3, 12, 10)), ValueError, ["empty"]),
    "vision/nan": ("fourier", lambda m: m(_full(IMG, NAN)), ValueError, ["finite", "720 NaN"]),
    "vision/inf": ("conv", lambda m: m(_full((1, 3, 16, 20), -INF)), ValueError, ["finite", "960 Inf"]),
    "vision/dtype": ("fourier", lambda m: m(torch.zeros(IMG, dtype=torch.float64)), TypeError, ["float64", "float32"]),
    "vision/half": ("conv", lambda m: m(torch.zeros(1, 3, 16, 20, dtype=torch.float16)), TypeError, ["float16", "float32"]),
    "vision/device": ("fourier", lambda m: m(torch.zeros(IMG, device="meta")), ValueError, ["meta", "cpu"]),
    "vision/size_learned": ("learned", lambda m: m(torch.zeros(1, 3, 7, 5)), ValueError, [r"\(6, 5\)", r"\(7, 5\)"]),
    "mlm/float_ids": ("mlm", lambda m: m(torch.zeros(1, 4)), TypeError, ["integer", "float32"]),
    "mlm/rank": ("mlm", lambda m: m(torch.zeros(1, 1, 4, dtype=torch.long)), ValueError, ["2 dims", r"\(1, 1, 4\)"]),
    "mlm/empty": ("mlm", lambda m: m(torch.zeros(1, 0, dtype=torch.long)), ValueError, ["empty"]),
    "mlm/too_long": ("mlm", lambda m: m(torch.zeros(1, 17, dtype=torch.long)), ValueError, ["17", "16"]),
    "mlm/id_range": ("mlm", lambda m: m(torch.tensor([[0, 262]])), ValueError, [r"\[0, 262\)", "262"]),
    "mlm/mask_shape": ("mlm", lambda m: m(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3)),
                       ValueError, [r"\(2, 4\)", r"\(2, 3\)"]),
    "mlm/additive_mask": ("mlm", lambda m: m(torch.zeros(1, 3, dtype=torch.long),
                                             attention_mask=torch.tensor([[0.0, -1e9, 0.0]])),
                          ValueError, ["0/1", "-1000000000", "additive"]),
    "mlm/mask_minus_inf": ("mlm", lambda m: m(torch.zeros(1, 2, dtype=torch.long),
                                              attention_mask=torch.tensor([[0.0, -INF]])), ValueError, ["0/1", "-inf"]),
    "mlm/mask_two": ("mlm", lambda m: m(torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.tensor([[1, 2]])),
                     ValueError, ["0/1", "2"]),
    "mlm/mask_device": ("mlm", lambda m: m(torch.zeros(1, 2, dtype=torch.long),
                                           attention_mask=torch.ones(1, 2, dtype=B, device="meta")),
                        ValueError, ["meta", "cpu"]),
    "mlm/ids_device": ("mlm", lambda m: m(torch.zeros(1, 2, dtype=torch.long, device="meta")), ValueError,
                       ["meta", "cpu"]),
    "mlm/labels_shape": ("mlm", lambda m: m(torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, 3, dtype=torch.long)),
                         ValueError, [r"\(2, 4\)", r"\(2, 3\)"]),
    "mlm/labels_float": ("mlm", lambda m: m(torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, 4)),
                         TypeError, ["integer", "float32"]),
    "cls/mask_polarity": ("cls", lambda m: m(torch.zeros(1, 3, dtype=torch.long),
                                             attention_mask=torch.tensor([[0, -1, -1]])), ValueError, ["0/1", "-1"]),
    "cls/labels_batch": ("cls", lambda m: m(torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(3, dtype=torch.long)),
                         ValueError, ["3", "2"]),
    "flow/frames": ("flow", lambda m: m(torch.zeros(1, 1, 3, 6, 8)), ValueError, [r"\[batch, 2", r"\(1, 1, 3, 6, 8\)"]),
    "flow/size": ("flow", lambda m: m(torch.zeros(1, 2, 3, 7, 8)), ValueError, ["6, 8", r"\(1, 2, 3, 7, 8\)"]),
    "flow/channels": ("flow", lambda m: m(torch.zeros(1, 2, 4, 6, 8)), ValueError, ["27", r"\(1, 2, 4, 6, 8\)"]),
    "flow/int": ("flow", lambda m: m(torch.zeros(1, 2, 3, 6, 8, dtype=torch.uint8)), TypeError, ["floating", "uint8"]),
    "flow/nan": ("flow", lambda m: m(_full((1, 2, 3, 6, 8), NAN)), ValueError, ["finite", "NaN"]),
    "mm/not_dict": ("mm", lambda m: m(torch.zeros(1, 2, 3, 8, 8)), TypeError, ["dict", "Tensor"]),
    "mm/missing": ("mm", lambda m: m({"audio": torch.rand(1, 32)}), ValueError, ["image", r"\[batch, 2, 3, 8, 8\]"]),
    "mm/unknown": ("mm", lambda m: m({**MM_OK, "text": torch.zeros(1)}), ValueError, ["text", "image"]),
    "mm/frames": ("mm", lambda m: m({**MM_OK, "image": torch.rand(1, 3, 3, 8, 8)}), ValueError,
                  ["2, 3, 8, 8", r"\(1, 3, 3, 8, 8\)"]),
    "mm/audio_len": ("mm", lambda m: m({**MM_OK, "audio": torch.rand(1, 40)}), ValueError, ["32", r"\(1, 40\)"]),
    "mm/batch": ("mm", lambda m: m({**MM_OK, "audio": torch.rand(2, 32)}), ValueError, ["batch size", "'audio': 2"]),
    "mm/label": ("mm", lambda m: m({**MM_OK, "label": torch.zeros(1, 4)}), ValueError, [r"\[batch, 5\]", r"\(1, 4\)"]),
    "mm/points_float": ("mm", lambda m: m(MM_OK, {"image": torch.tensor([1.0])}), TypeError, ["integer", "float32"]),
    "mm/points_range": ("mm", lambda m: m(MM_OK, {"image": torch.tensor([128])}), ValueError, [r"\[0, 128\)", "128"]),
    "mm/points_rank": ("mm", lambda m: m(MM_OK, {"image": torch.tensor([[1]])}), ValueError, ["1-D", r"\(1, 1\)"]),
    "mm/nan_audio": ("mm", lambda m: m({**MM_OK, "audio": _full((1, 32), NAN)}), ValueError, ["audio", "32 NaN"]),
    # ---- perceiver-pytorch family (shape/dtype cases are in tests/models/test_bad_input.py)
    "perceiver/nan": ("perceiver", lambda m: m(_full((1, 4, 4, 3), NAN)), ValueError, ["data", "finite", "48 NaN"]),
    "perceiver/dtype": ("perceiver", lambda m: m(torch.zeros(1, 4, 4, 3, dtype=torch.bfloat16)), TypeError,
                        ["bfloat16", "float32"]),
    "perceiver/device": ("perceiver", lambda m: m(torch.zeros(1, 4, 4, 3, device="meta")), ValueError, ["meta", "cpu"]),
    "perceiver/pos_nan": ("perceiver", lambda m: m(torch.zeros(1, 5, 3), pos=_full((1, 5, 2), NAN)), ValueError,
                          ["pos", "NaN"]),
    "perceiver/mask_float": ("perceiver", lambda m: m(torch.zeros(1, 2, 2, 3), mask=torch.ones(1, 4)), ValueError,
                             ["torch.bool", "float32"]),
    "perceiver/mask_device": ("perceiver", lambda m: m(torch.zeros(1, 2, 2, 3), mask=torch.ones(1, 4, dtype=B, device="meta")),
                              ValueError, ["mask", "meta", "cpu"]),
    "io/mask_device": ("io", lambda m: m(torch.zeros(1, 3, 6), mask=torch.ones(1, 3, dtype=B, device="meta")), ValueError,
                       ["mask", "meta", "cpu"]),
    "multi/mask_device": ("multi", lambda m: m({"a": torch.zeros(1, 4, 3)}, masks={"a": torch.ones(1, 4, dtype=B,
                                                                                                 device="meta")}),
                          ValueError, ["masks", "meta", "cpu"]),
    "gated/mask_device": ("gated", lambda m: m(torch.zeros(1, 4, 3), mask=torch.ones(1, 4, dtype=B, device="meta")),
                          ValueError, ["mask", "meta"]),
    "io/queries_nan": ("io", lambda m: m(torch.zeros(1, 3, 6), queries=_full((2, 8), NAN)), ValueError,
                       ["queries", "NaN"]),
    "io/queries_dtype": ("io", lambda m: m(torch.zeros(1, 3, 6), queries=torch.zeros(2, 8, dtype=torch.float64)),
                         TypeError, ["queries", "float64"]),
    "lm/device": ("lm", lambda m: m(torch.zeros(1, 3, dtype=torch.long, device="meta")), ValueError, ["meta", "cpu"]),
    "lm/empty": ("lm", lambda m: m(torch.zeros(1, 0, dtype=torch.long)), ValueError, ["empty"]),
    "gated/nan": ("gated", lambda m: m(_full((1, 4, 3), INF)), ValueError, ["finite", "12 Inf"]),
    "gated/dtype": ("gated", lambda m: m(torch.zeros(1, 4, 3, dtype=torch.float64)), TypeError, ["float64", "float32"]),
    "multi/nan": ("multi", lambda m: m({"a": _full((1, 4, 3), NAN)}), ValueError, [r"\['a'\]", "NaN"]),
    "multi/device": ("multi", lambda m: m({"a": torch.zeros(1, 4, 3, device="meta")}), ValueError, ["meta", "cpu"]),
    # ---- composed Perceiver IO without a preprocessor
    "iomodel/rank": ("iomodel", lambda m: m(torch.zeros(2, 5)), ValueError, [r"\[batch, tokens, channels\]", r"\(2, 5\)"]),
    "iomodel/channels": ("iomodel", lambda m: m(torch.zeros(2, 3, 4)), ValueError, ["5", r"\(2, 3, 4\)"]),
    "iomodel/empty": ("iomodel", lambda m: m(torch.zeros(2, 0, 5)), ValueError, ["empty"]),
    "iomodel/list": ("iomodel", lambda m: m([[0.0] * 5]), TypeError, ["torch.Tensor", "list"]),
    "iomodel/mask_list": ("iomodel", lambda m: m(torch.zeros(2, 3, 5), input_mask=[[1, 1, 1]] * 2), TypeError,
                          ["input_mask", "list"]),
    "iomodel/mask_shape": ("iomodel", lambda m: m(torch.zeros(2, 3, 5), input_mask=torch.ones(3, dtype=B)), ValueError,
                           ["batch=2", r"\(3,\)"]),
    "iomodel/query_mask": ("iomodel", lambda m: m(torch.zeros(2, 3, 5), query_mask=torch.ones(2, 3, dtype=B)),
                           ValueError, ["query_mask", "2", r"\(2, 3\)"]),
    "iomodel/additive": ("iomodel", lambda m: m(torch.zeros(2, 3, 5), input_mask=torch.zeros(2, 3) - 1e4), ValueError,
                         ["0/1", "additive"]),
    "iomodel/empty_dict": ("iomodel", lambda m: m({}), ValueError, ["empty mapping"]),
    # ---- tokenizer
    "tok/int": ("tok", lambda t: t(5), TypeError, ["str", "int"]),
    "tok/bytes": ("tok", lambda t: t(b"abc"), TypeError, ["str", "bytes"]),
    "tok/none": ("tok", lambda t: t(None), TypeError, ["str", "NoneType"]),
    "tok/mixed": ("tok", lambda t: t(["a", 5]), TypeError, ["str", "int"]),
    "tok/empty": ("tok", lambda t: t([]), ValueError, ["empty"]),
    "tok/max_length": ("tok", lambda t: t("abc", max_length=0), ValueError, [">= 1", "0"]),
    "tok/too_long": ("tok", lambda t: t("abcdefghij", truncation=False), ValueError, ["10", "max_length=8"]),
    "tok/padding": ("tok", lambda t: t("abc", padding="left"), ValueError, ["max_length", "left"]),
    "tok/decode_float": ("tok", lambda t: t.decode([3.7]), TypeError, ["integers", "3.7"]),
    "tok/decode_float_tensor": ("tok", lambda t: t.decode(torch.tensor([7.0])), TypeError, ["integer", "float32"]),
    "tok/decode_range": ("tok", lambda t: t.decode([300]), ValueError, ["300", r"\[0, 262\)"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_named(m, case):
    key, call, exc, fragments = CASES[case]
    with pytest.raises(exc) as info:
        call(m[key])
    message = str(info.value)
    for fragment in fragments:
        assert re.search(fragment, message), f"{fragment!r} not in {message!r}"


STANDALONE = {
    "image_pre/list": (lambda: ImagePreprocessor("pixels", spatial_downsample=1)([[1.0]]), TypeError, ["Tensor", "list"]),
    "image_pre/int": (lambda: ImagePreprocessor("pixels", spatial_downsample=1)(torch.zeros(1, 3, 4, 4, dtype=torch.long)),
                      TypeError, ["floating", "int64"]),
    "image_pre/empty": (lambda: ImagePreprocessor("pixels", spatial_downsample=1)(torch.zeros(1, 3, 0, 4)), ValueError,
                        ["empty"]),
    "audio_pre/int": (lambda: AudioPreprocessor(4)(torch.zeros(1, 8, dtype=torch.long)), TypeError, ["audio", "int64"]),
    "audio_pre/patch": (lambda: AudioPreprocessor(4)(torch.zeros(1, 7)), ValueError, ["7", "samples_per_patch=4"]),
    "onehot/int": (lambda: OneHotPreprocessor(3)(torch.zeros(1, 3, dtype=torch.long)), TypeError, ["labels", "int64"]),
    "multimodal_pre/tensor": (lambda: MultimodalPreprocessor({"a": AudioPreprocessor(4)})(torch.zeros(1, 8)), TypeError,
                              ["dict", "Tensor"]),
    "multimodal_pre/batch": (lambda: MultimodalPreprocessor({"a": AudioPreprocessor(4), "b": OneHotPreprocessor(3)})(
        {"a": torch.zeros(2, 8), "b": torch.zeros(1, 3)}), ValueError, ["batch size", "'a': 2"]),
    "grid/none": (lambda: pad_grid_batch([]), ValueError, ["at least one"]),
    "grid/list": (lambda: pad_grid_batch([[1.0, 2.0]]), TypeError, ["samples\\[0\\]", "list"]),
    "grid/empty_sample": (lambda: pad_grid_batch([torch.ones(2, 2, 3), torch.ones(0, 2, 3)]), ValueError,
                          ["samples\\[1\\]", "empty"]),
    "grid/int": (lambda: pad_grid_batch([torch.ones(2, 2, 3, dtype=torch.long)]), TypeError, ["floating", "int64"]),
    "grid/nan": (lambda: pad_grid_batch([_full((2, 2, 3), NAN)]), ValueError, ["points\\[0\\]", "12 NaN"]),
    "grid/dtype_mix": (lambda: pad_grid_batch([torch.ones(2, 2, 3), torch.ones(2, 2, 3, dtype=torch.float64)]),
                       TypeError, ["float64", "float32"]),
    "grid/device_mix": (lambda: pad_grid_batch([torch.ones(2, 2, 3), torch.ones(2, 2, 3, device="meta")]), TypeError,
                        ["meta", "cpu"]),
    "grid/channels": (lambda: pad_grid_batch([torch.ones(2, 2, 3), torch.ones(2, 2, 4)]), ValueError, ["3", r"\(4, 4\)"]),
    "points/coords_list": (lambda: pad_point_batch([torch.ones(3, 2)], [[0.0, 1.0]]), TypeError, ["coords", "list"]),
    "points/coords_shape": (lambda: pad_point_batch([torch.ones(3, 2)], [torch.ones(4, 2)]), ValueError,
                            [r"\[3, 2\]", r"\(4, 2\)"]),
    "points/coords_inf": (lambda: pad_point_batch([torch.ones(3, 2)], [_full((3, 1), INF)]), ValueError,
                          ["coords", "Inf"]),
}


@pytest.mark.parametrize("case", sorted(STANDALONE))
def test_bad_input_is_named_standalone(case):
    call, exc, fragments = STANDALONE[case]
    with pytest.raises(exc) as info:
        call()
    for fragment in fragments:
        assert re.search(fragment, str(info.value)), f"{fragment!r} not in {info.value!r}"


def test_checks_run_before_heavy_work(m, monkeypatch):
    """A bad input never reaches the encoder: the error comes from the boundary, not from deep inside."""
    calls = []
    model = m["fourier"]
    hook = model.perceiver.encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for bad in (_full(IMG, NAN), torch.zeros(IMG, dtype=torch.float64), torch.zeros(2, 3, 0, 10)):
            with pytest.raises((ValueError, TypeError)):
                model(bad)
    finally:
        hook.remove()
    assert not calls


def test_valid_inputs_still_work(m):
    """Accepted forms: 0/1 integer and float masks (HF style), bool masks, partially padded batches."""
    ids = torch.randint(0, 262, (2, 5))
    for mask in (torch.tensor([[1, 1, 1, 0, 0], [1] * 5]), torch.tensor([[1.0, 1, 1, 0, 0], [1] * 5]),
                 torch.tensor([[True, True, True, False, False], [True] * 5])):
        assert m["mlm"](ids, attention_mask=mask).logits.shape == (2, 5, 262)
    assert m["mm"](MM_OK).logits["label"].shape == (1, 5)
    data, pos, mask = pad_grid_batch([torch.randn(2, 3, 3), torch.randn(4, 4, 3)])
    assert m["perceiver"](data, mask=mask, pos=pos).shape == (2, 3)


def test_finite_policy_switches(m):
    """NaN checks: on by default, off globally or in a block, skipped while compiling/tracing."""
    x = _full(IMG, NAN)
    assert finite_checks_enabled()
    with finite_checks(False):
        assert not torch.isfinite(m["fourier"](x).logits).all()  # garbage in, garbage out — but no check cost
    with pytest.raises(ValueError, match="finite"):
        m["fourier"](x)
    previous = set_finite_checks(False)
    try:
        m["fourier"](x)
    finally:
        set_finite_checks(previous)


def test_finite_check_is_skipped_while_tracing(m):
    traced = torch.jit.trace(m["perceiver"], (torch.randn(1, 4, 4, 3),), check_trace=False)
    out = traced(_full((1, 4, 4, 3), NAN))  # no data-dependent branch was recorded
    assert out.shape == (1, 3)
