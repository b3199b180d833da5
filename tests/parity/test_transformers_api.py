"""transformers' calling convention on our task models, against transformers itself.

Each test loads a tiny random transformers checkpoint (``_transformers_models``) through
``perceivers.hf.<transformers name>.from_pretrained(..., numerics="transformers")`` and calls both
models with the same transformers keywords (``inputs=``, ``labels=``, ``output_hidden_states=``,
``output_attentions=``, ``return_dict=``): logits, loss, every hidden state, attention and
cross-attention must agree within 1e-5, and the ``return_dict=False`` tuples must have the same layout.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _transformers_models import ALL_CONFIGS, checkpoint_factory, edited_copy
from _transformers_models import inputs as make_inputs

import perceivers
from perceivers import hf as phf
from perceivers.layers.attention import Attention, record_attention
from perceivers.tasks import ImageClassifier, create_model

ATOL = 1e-5
ERRORS: dict[str, dict[str, float]] = {}
MM_POINTS = {"image": torch.arange(64, 128), "audio": torch.arange(2, 4), "label": None}


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    return checkpoint_factory(tmp_path_factory)


def _call_inputs(arch, seed=1):
    """transformers' keywords: the main input always as ``inputs=``; labels where the head has a loss."""
    kw = make_inputs(arch, seed)
    if "pixel_values" in kw:
        kw["inputs"] = kw.pop("pixel_values")
    g = torch.Generator().manual_seed(seed + 10)
    batch = 2
    if arch.startswith("PerceiverForImageClassification"):
        kw["labels"] = torch.randint(0, 5, (batch,), generator=g)
    elif arch == "PerceiverForSequenceClassification":
        kw["labels"] = torch.randint(0, 3, (batch,), generator=g)
        kw["attention_mask"][1, 11:] = 0
    elif arch == "PerceiverForMaskedLM":
        labels = torch.randint(0, 262, (batch, 16), generator=g)
        labels[:, ::3] = -100
        kw["labels"] = labels
    elif arch == "PerceiverForMultimodalAutoencoding":
        kw["subsampled_output_points"] = MM_POINTS
    return kw


def _diff(a, b) -> float:
    if isinstance(a, dict):
        assert set(a) == set(b), (sorted(a), sorted(b))
        return max(_diff(a[k], b[k]) for k in a)
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a.detach() - b.detach()).abs().max())


def _diff_tuple(name, ours, theirs) -> float:
    assert theirs is not None and ours is not None, name
    assert len(ours) == len(theirs), f"{name}: {len(ours)} tensors, transformers {len(theirs)}"
    return max(_diff(o, t) for o, t in zip(ours, theirs))


def _record(arch, field, err):
    ERRORS.setdefault(arch, {})[field] = max(err, ERRORS.get(arch, {}).get(field, 0.0))
    assert err < ATOL, f"{arch}.{field}: max |ours - transformers| = {err:.3g}"


def _assert_same_tuple(arch, got, want):
    """``return_dict=False`` results: the same layout (types, lengths) and values."""
    assert isinstance(got, tuple) and len(got) == len(want), (type(got).__name__, len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        assert type(g) is type(w), f"element {i}: {type(g).__name__} vs transformers' {type(w).__name__}"
        err = _diff_tuple(f"element {i}", g, w) if isinstance(w, tuple) else _diff(g, w)
        _record(arch, "return_dict=False", err)


@pytest.mark.parametrize("arch", list(ALL_CONFIGS))
def test_outputs_match_transformers(hf_checkpoint, arch):
    hf, directory = hf_checkpoint(arch)
    ours = getattr(phf, arch).from_pretrained(directory, numerics="transformers")
    assert isinstance(ours, getattr(phf, arch))
    kw = _call_inputs(arch)
    flags = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        want = hf(**kw, **flags)
        got = ours(**kw, **flags)
    _record(arch, "logits", _diff(got.logits, want.logits))
    first = int("labels" in kw)  # out[i] follows transformers' to_tuple(): (loss?, logits, ...)
    assert len(got.to_tuple()) == len(want.to_tuple()) and _diff(got[first], want[first]) < ATOL
    assert got["logits"] is got.logits
    if "labels" in kw:
        _record(arch, "loss", _diff(got.loss, want.loss))
    else:
        assert got.loss is None and want.loss is None
    _record(arch, "hidden_states", _diff_tuple("hidden_states", got.hidden_states, want.hidden_states))
    _record(arch, "attentions", _diff_tuple("attentions", got.attentions, want.attentions))
    _record(arch, "cross_attentions", _diff_tuple("cross_attentions", got.cross_attentions, want.cross_attentions))
    cfg = ALL_CONFIGS[arch]
    assert len(got.hidden_states) == cfg["num_blocks"] * (cfg["num_self_attends_per_block"] + 1)
    assert len(got.attentions) == cfg["num_blocks"] * cfg["num_self_attends_per_block"]
    assert len(got.cross_attentions) == 2  # encoder, then decoder


@pytest.mark.parametrize("arch", list(ALL_CONFIGS))
@pytest.mark.parametrize("flags", [{}, {"output_hidden_states": True}, {"output_attentions": True},
                                   {"output_hidden_states": True, "output_attentions": True}])
def test_return_dict_false_tuples_match_transformers(hf_checkpoint, arch, flags):
    hf, directory = hf_checkpoint(arch)
    ours = getattr(phf, arch).from_pretrained(directory, numerics="transformers")
    kw = _call_inputs(arch)
    with torch.no_grad():
        want = hf(**kw, **flags, return_dict=False)
        got = ours(**kw, **flags, return_dict=False)
    _assert_same_tuple(arch, got, want)


@pytest.mark.parametrize("arch", list(ALL_CONFIGS))
def test_config_output_flags_are_the_call_defaults(hf_checkpoint, arch, tmp_path):
    """A config.json with output_hidden_states and output_attentions true and return_dict false: transformers'
    head loaded from it and called without those keywords returns the tuple with hidden states and attentions;
    ours too (either numerics, and after save_pretrained), and a keyword given to the call still wins."""
    _, directory = hf_checkpoint(arch)
    flags = {"output_hidden_states": True, "output_attentions": True, "return_dict": False}
    directory = edited_copy(directory, tmp_path / "hf", **flags)
    hf = getattr(transformers, arch).from_pretrained(directory).eval()
    ours = getattr(phf, arch).from_pretrained(directory, numerics="transformers")
    assert all(getattr(ours.config, k) is v for k, v in flags.items())
    kw = _call_inputs(arch)
    explicit = {"return_dict": True, "output_attentions": False}
    with torch.no_grad():
        _assert_same_tuple(arch, ours(**kw), hf(**kw))
        want, got = hf(**kw, **explicit), ours(**kw, **explicit)
        ours.save_pretrained(tmp_path / "ours")
        again = perceivers.from_pretrained(tmp_path / "ours")
        _assert_same_tuple(arch, again(**kw), hf(**kw))
        deepmind = getattr(phf, arch).from_pretrained(directory)(**kw)
    assert got.attentions is None and got.cross_attentions is None and want.attentions is None
    _record(arch, "logits", _diff(got.logits, want.logits))
    _record(arch, "hidden_states", _diff_tuple("hidden_states", got.hidden_states, want.hidden_states))
    assert isinstance(deepmind, tuple) and len(deepmind) == len(want.to_tuple()) + 3  # + attentions, 2 cross


@pytest.mark.parametrize("arch", list(ALL_CONFIGS))
def test_attention_dropout_as_transformers(hf_checkpoint, arch, tmp_path):
    """numerics="transformers" takes over attention_probs_dropout_prob: every attention layer, the encoder's and
    the decoder's, drops attention probabilities in training, as each of transformers' does (and nothing else
    drops). With p = 1 both models zero every attention map: a deterministic train-mode comparison. Eval outputs
    are unaffected; DeepMind numerics keep the official model's no dropout; our format keeps the field."""
    from perceivers.convert.transformers import transformers_config

    _, directory = hf_checkpoint(arch)
    directory = edited_copy(directory, tmp_path / "hf", attention_probs_dropout_prob=1.0)
    hf = getattr(transformers, arch).from_pretrained(directory).eval()
    ours = getattr(phf, arch).from_pretrained(directory, numerics="transformers")
    hf_layers = [m for m in hf.modules() if type(m).__name__ == "PerceiverSelfAttention"]
    layers = [m for m in ours.modules() if isinstance(m, Attention)]
    assert len(layers) == len(hf_layers) and {m.dropout for m in layers} == {1.0}
    assert {m.dropout.p for m in hf_layers} == {1.0}
    kw = _call_inputs(arch)
    with torch.no_grad():
        _record(arch, "logits (eval, attention dropout 1)", _diff(ours(**kw).logits, hf(**kw).logits))
        want, got = hf.train()(**kw), ours.train()(**kw)
    _record(arch, "logits (training, attention dropout 1)", _diff(got.logits, want.logits))
    if "labels" in kw:
        _record(arch, "loss (training, attention dropout 1)", _diff(got.loss, want.loss))
    deepmind = getattr(phf, arch).from_pretrained(directory)
    assert {m.dropout for m in deepmind.modules() if isinstance(m, Attention)} == {0.0}
    ours.save_pretrained(tmp_path / "ours")
    again = perceivers.from_pretrained(tmp_path / "ours")
    assert {m.dropout for m in again.modules() if isinstance(m, Attention)} == {1.0}
    assert transformers_config(again)["attention_probs_dropout_prob"] == 1.0


def test_masked_lm_padding(hf_checkpoint):
    """With padding, everything but the logits at padded positions equals transformers' (DeepMind zeroes the
    decoder attention of padded queries, transformers ignores the decoder query mask)."""
    arch = "PerceiverForMaskedLM"
    hf, directory = hf_checkpoint(arch)
    ours = phf.PerceiverForMaskedLM.from_pretrained(directory, numerics="transformers")
    kw = _call_inputs(arch)
    kw.pop("labels")
    kw["attention_mask"][1, 10:] = 0
    with torch.no_grad():
        want = hf(**kw, output_hidden_states=True, output_attentions=True)
        got = ours(**kw, output_hidden_states=True, output_attentions=True)
    real = kw["attention_mask"].bool()
    _record(arch, "logits (padded batch, real positions)", _diff(got.logits[real], want.logits[real]))
    for field in ("hidden_states", "attentions", "cross_attentions"):
        _record(arch, f"{field} (padded batch)", _diff_tuple(field, getattr(got, field), getattr(want, field)))
    assert float(got.cross_attentions[0][1, ..., 10:].abs().max()) == 0.0  # masked keys get exactly 0


def test_all_padding_sample_gets_zero_weights(hf_checkpoint):
    """A sample whose mask is all 0 has a zero cross-attention output, so its returned weights are zero too (they
    were a softmax over the padding that multiplied nothing); the other sample's are transformers'."""
    arch = "PerceiverForMaskedLM"
    hf, directory = hf_checkpoint(arch)
    ours = phf.PerceiverForMaskedLM.from_pretrained(directory, numerics="transformers")
    kw = _call_inputs(arch)
    kw.pop("labels")
    kw["attention_mask"][1] = 0
    with torch.no_grad():
        want = hf(**kw, output_attentions=True).cross_attentions[0]
        got = ours(**kw, output_attentions=True).cross_attentions[0]
    assert float(got[1].abs().max()) == 0.0
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)


def test_loss_backward_with_attentions(hf_checkpoint):
    """The brief's example: labels, hidden states and attentions, then backward through the loss."""
    arch = "PerceiverForImageClassificationConvProcessing"
    hf, directory = hf_checkpoint(arch)
    model = phf.PerceiverForImageClassificationConvProcessing.from_pretrained(directory, numerics="transformers")
    kw = _call_inputs(arch)
    out = model(**kw, output_hidden_states=True, output_attentions=True)
    out.loss.backward()
    hf.zero_grad()
    hf(**kw, output_hidden_states=True, output_attentions=True).loss.backward()
    ours_grad = model.perceiver.decoder.decoder.output.weight.grad
    want_grad = hf.perceiver.decoder.decoder.final_layer.weight.grad
    _record(arch, "grad (decoder output weight)", _diff(ours_grad, want_grad))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ default numerics

TINY = {
    "vision-perceiver-conv": lambda g: {"pixel_values": torch.randn(2, 3, 16, 20, generator=g)},
    "vision-perceiver-fourier": lambda g: {"pixel_values": torch.randn(2, 3, 12, 10, generator=g)},
    "vision-perceiver-learned": lambda g: {"pixel_values": torch.randn(2, 3, 6, 5, generator=g)},
    "language-perceiver": lambda g: {"inputs": torch.randint(0, 262, (2, 16), generator=g)},
    "language-perceiver-classifier": lambda g: {"inputs": torch.randint(0, 262, (2, 16), generator=g)},
    "optical-flow-perceiver": lambda g: {"inputs": torch.randn(1, 2, 3, 6, 8, generator=g)},
    "multimodal-perceiver": lambda g: {"inputs": {"image": torch.rand(1, 2, 3, 8, 8, generator=g),
                                                  "audio": torch.rand(1, 32, generator=g) - 0.5}},
}


@pytest.mark.parametrize("name", list(TINY))
def test_default_numerics_with_transformers_keywords(name):
    model = create_model(name, tiny=True).eval()
    kw = TINY[name](torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(**kw)
        out = model(**kw, output_hidden_states=True, output_attentions=True)
        tup = model(**kw, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert plain.hidden_states is None and plain.attentions is None and plain.cross_attentions is None
    assert _diff(out.logits, plain.logits) < ATOL  # explicit softmax vs SDPA: float rounding only
    assert torch.equal(out.last_hidden_state, out.hidden_states[-1])
    c = model.config
    assert len(out.hidden_states) == c.num_blocks * (c.num_self_attends_per_block + 1)
    assert len(out.attentions) == c.num_blocks * c.num_self_attends_per_block
    assert len(out.cross_attentions) == 2
    for w in (*out.attentions, *out.cross_attentions):  # rows are distributions
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    # (logits, hidden_states, attentions, (encoder cross,), decoder cross)
    assert len(tup) == 5 and _diff(tup[0], plain.logits) < ATOL
    assert isinstance(tup[3], tuple) and len(tup[3]) == 1 and _diff(tup[3][0], out.cross_attentions[0]) < ATOL
    assert _diff(tup[4], out.cross_attentions[1]) < ATOL


def test_default_path_unchanged_and_leaves_no_trace():
    """Without the flags, nothing is recorded and the layers keep their class methods."""
    model = create_model("vision-perceiver-fourier", tiny=True).eval()
    x = torch.randn(2, 3, 12, 10)
    with torch.no_grad():
        before = model(x).logits
        model(x, output_attentions=True)
        after = model(x).logits
    assert torch.equal(before, after)
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, Attention))


def test_recording_sees_streamed_cross_attention():
    """A context streamed in chunks (the encoder's chunked path) is recorded whole, with the same weights."""
    model = create_model("vision-perceiver-fourier", tiny=True).eval()
    x = torch.randn(1, 3, 12, 10)
    with torch.no_grad():
        whole = model(x, output_attentions=True)
        model.perceiver.encoder.cross_attention.chunk_size = 7  # 120 tokens in chunks of 7
        with record_attention(model) as records:
            streamed = model(x).logits
    assert records[0][0] is model.perceiver.encoder.cross_attention.attn
    torch.testing.assert_close(records[0][1], whole.cross_attentions[0], atol=1e-6, rtol=0)
    assert _diff(streamed, whole.logits) < ATOL
    with pytest.raises(RuntimeError, match="do not nest"), record_attention(model), record_attention(model):
        pass


def test_training_mode_records_weights_after_dropout():
    model = create_model("vision-perceiver-fourier", tiny=True, dropout=0.5).train()
    out = model(torch.randn(2, 3, 12, 10), output_attentions=True)
    assert any(float((w == 0).float().mean()) > 0.2 for w in out.attentions)


# ------------------------------------------------------------------------------------ loading and errors


def test_from_pretrained_refuses_other_architectures(hf_checkpoint):
    _, directory = hf_checkpoint("PerceiverForImageClassificationFourier")
    with pytest.raises(ValueError, match="PerceiverForImageClassificationFourier.*not a PerceiverForOpticalFlow"):
        phf.PerceiverForOpticalFlow.from_pretrained(directory)
    with pytest.raises(ValueError, match="not a PerceiverForImageClassificationConvProcessing"):
        phf.PerceiverForImageClassificationConvProcessing.from_pretrained(directory)


def test_sequence_classifier_from_masked_lm_checkpoint(hf_checkpoint):
    """transformers' documented start: PerceiverForSequenceClassification.from_pretrained(<masked LM>)."""
    _, directory = hf_checkpoint("PerceiverForMaskedLM")
    model = phf.PerceiverForSequenceClassification.from_pretrained(directory, num_labels=4)
    assert isinstance(model, phf.PerceiverForSequenceClassification) and model.config.num_labels == 4
    assert model.trunk_transfer.loaded


def test_isinstance_and_save_pretrained_round_trip(tmp_path):
    model = create_model("vision-perceiver-conv", tiny=True).eval()
    assert isinstance(model, phf.PerceiverForImageClassificationConvProcessing)
    assert isinstance(model, ImageClassifier)
    assert not isinstance(model, phf.PerceiverForImageClassificationFourier)
    assert not isinstance(torch.nn.Linear(1, 1), phf.PerceiverForImageClassificationConvProcessing)
    model.save_pretrained(tmp_path)
    again = phf.PerceiverForImageClassificationConvProcessing.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 16, 20)
    assert torch.equal(again(inputs=x).logits, model(x).logits)
    assert type(perceivers.from_pretrained(tmp_path)) is ImageClassifier


def test_constructing_from_a_transformers_config(hf_checkpoint):
    hf, _ = hf_checkpoint("PerceiverForImageClassificationLearned")
    model = phf.PerceiverForImageClassificationLearned(hf.config, numerics="transformers")
    assert isinstance(model, phf.PerceiverForImageClassificationLearned)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    small = phf.PerceiverForOpticalFlow(tiny=True)
    assert small.config.train_size == (6, 8)
    with pytest.raises(TypeError, match="PerceiverConfig or a dict"):
        phf.PerceiverForMaskedLM(42)


def test_bad_inputs_are_refused():
    image = create_model("vision-perceiver-conv", tiny=True).eval()
    x = torch.randn(2, 3, 16, 20)
    with pytest.raises(ValueError, match="exactly one.*got both"):
        image(pixel_values=x, inputs=x)
    with pytest.raises(ValueError, match="exactly one.*got neither"):
        image()
    with pytest.raises(ValueError, match="batch size"):
        image(x, labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="single-label classification needs integer class ids"):
        image(x, labels=torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="multi-label classification needs labels of shape"):
        image(x, labels=torch.rand(2, 3))
    with pytest.raises(ValueError, match="head_mask"):
        image(x, head_mask=torch.ones(2))
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        image(x, interpolate_pos_encoding=True)
    lm = create_model("language-perceiver", tiny=True).eval()
    ids = torch.randint(0, 262, (2, 8))
    with pytest.raises(ValueError, match="exactly one.*got both"):
        lm(inputs=ids, input_ids=ids)
    with pytest.raises(ValueError, match="labels must have the shape"):
        lm(ids, labels=ids[:, :4])
    flow = create_model("optical-flow-perceiver", tiny=True).eval()
    with pytest.raises(NotImplementedError, match="no built-in loss"):
        flow(torch.randn(1, 2, 3, 6, 8), labels=torch.zeros(1, 6, 8, 2))
    mm = create_model("multimodal-perceiver", tiny=True).eval()
    with pytest.raises(NotImplementedError, match="no built-in loss"):
        mm({"image": torch.rand(1, 2, 3, 8, 8), "audio": torch.rand(1, 32)}, labels=torch.zeros(1))


def test_image_classifier_losses_follow_problem_type():
    import torch.nn.functional as F

    model = create_model("vision-perceiver-fourier", tiny=True).eval()
    x = torch.randn(2, 3, 12, 10)
    logits = model(x).logits
    multi = torch.rand(2, 5).round()
    torch.testing.assert_close(model(x, labels=multi).loss, F.binary_cross_entropy_with_logits(logits, multi))
    model.config.problem_type = "regression"
    torch.testing.assert_close(model(x, labels=multi).loss, F.mse_loss(logits, multi))
    one = create_model("vision-perceiver-fourier", tiny=True, num_labels=1).eval()
    target = torch.randn(2)
    torch.testing.assert_close(one(x, labels=target).loss, F.mse_loss(one(x).logits.squeeze(-1), target))


def test_problem_type_travels_with_transformers_checkpoints(tmp_path):
    """A transformers image classifier saved with problem_type gets that loss here, and it is written back out."""
    import torch.nn.functional as F

    from perceivers.convert.transformers import transformers_config

    arch = "PerceiverForImageClassificationFourier"
    ref = getattr(transformers, arch)(transformers.PerceiverConfig(**ALL_CONFIGS[arch], problem_type="regression"))
    ref.save_pretrained(tmp_path / "hf")
    ours = getattr(phf, arch).from_pretrained(tmp_path / "hf", numerics="transformers").eval()
    assert ours.config.problem_type == "regression"
    x, target = torch.randn(2, 3, 12, 10), torch.rand(2, ALL_CONFIGS[arch]["num_labels"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, labels=target).loss, F.mse_loss(ours(x).logits, target))
        torch.testing.assert_close(ours(x, labels=target).loss, ref(pixel_values=x, labels=target).loss,
                                   atol=1e-5, rtol=0)
    assert transformers_config(ours)["problem_type"] == "regression"


# ------------------------------------------------------------------------------------ tokenizer

TEXTS = ["Hello, Perceiver!", "a [MASK] b", "ünïcode ✓", ""]


@pytest.mark.parametrize("kwargs", [{}, {"padding": True}, {"padding": "max_length", "max_length": 24},
                                    {"padding": True, "return_tensors": "pt"},
                                    {"truncation": True, "max_length": 5}])
def test_tokenizer_matches_transformers(kwargs):
    ref, ours = transformers.PerceiverTokenizer(), phf.PerceiverTokenizer.from_pretrained("deepmind/language-perceiver")
    want, got = ref(TEXTS, **kwargs), ours(TEXTS, **kwargs)
    for key in ("input_ids", "attention_mask"):
        w, g = want[key], got[key]
        assert (w.tolist() if isinstance(w, torch.Tensor) else w) == (g.tolist() if isinstance(g, torch.Tensor) else g)
        assert isinstance(g, torch.Tensor) == isinstance(w, torch.Tensor)
    single_want, single_got = ref(TEXTS[1]), ours(TEXTS[1])
    assert single_want["input_ids"] == single_got["input_ids"]
    assert ref("ab", "cd")["input_ids"] == ours("ab", "cd")["input_ids"]
    for a, b in (("abcdef", "xy"), ("ab", "xyzw"), ("abc", "xyz")):  # the longer text is cut first
        assert ref(a, b, truncation=True, max_length=6) == ours(a, b, truncation=True, max_length=6)


def test_tokenizer_decode_matches_transformers():
    ref, ours = transformers.PerceiverTokenizer(), phf.PerceiverTokenizer()
    ids = ref("Hi [MASK] there", padding="max_length", max_length=20)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert ours.decode(torch.tensor(ids), skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.pad_token_id == ref.pad_token_id and ours.mask_token_id == ref.mask_token_id
    assert ours.model_max_length == ref.model_max_length and len(ours) == len(ref)


def test_report_max_errors():
    """Prints the measured differences per head and field (run with -s)."""
    for arch, fields in sorted(ERRORS.items()):
        print(arch + ": " + ", ".join(f"{k} {v:.1e}" for k, v in fields.items()))
