"""perceivers.tasks: registry, official sizes, configs and the task models' inputs and outputs."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

import perceivers
from perceivers import create_model, list_models
from perceivers.tasks import model_entry

NAMES = [
    "language-perceiver",
    "language-perceiver-classifier",
    "language-perceiver-token-classifier",
    "multimodal-perceiver",
    "optical-flow-perceiver",
    "vision-perceiver-conv",
    "vision-perceiver-fourier",
    "vision-perceiver-learned",
]


def _inputs(name: str, model, batch: int = 2):
    c = model.config
    if name.startswith("vision"):
        return (torch.randn(batch, c.in_channels, *c.image_size),)
    if name.startswith("language-perceiver"):
        ids = torch.randint(0, c.vocab_size, (batch, c.max_position_embeddings))
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        return (ids, mask)
    if name == "optical-flow-perceiver":
        return (torch.rand(batch, 2, 3, *c.train_size) * 2 - 1,)
    return ({"image": torch.rand(batch, c.num_frames, c.in_channels, *c.image_size),
             "audio": torch.rand(batch, c.num_audio_samples, 1) - 0.5},)


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_returns_the_output_dataclass(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, tiny=True).eval()
    args = _inputs(name, model)
    exported = torch.export.export(model, args)
    out, ref = exported.module()(*args), model(*args)
    assert type(out) is type(ref)
    leaves = torch.utils._pytree.tree_leaves
    torch.testing.assert_close(leaves(out), leaves(ref), atol=1e-5, rtol=1e-5)


def test_conv_vision_exports_with_a_dynamic_image_size() -> None:
    """The conv preprocessor's grid (after its stride-4 stem) takes its Fourier features from the symbolic
    size; torch needs images of at least 16 pixels a side there (its padding rules)."""
    torch.manual_seed(0)
    model = create_model("vision-perceiver-conv", tiny=True).eval()
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("h", min=16, max=256),
            3: torch.export.Dim("w", min=16, max=256)}
    exported = torch.export.export(model, _inputs("vision-perceiver-conv", model), dynamic_shapes=(dims,))
    for batch, h, w in ((1, 16, 17), (3, 20, 36), (1, 255, 31)):
        x = torch.randn(batch, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_dropout_reaches_encoder_and_decoder(name: str) -> None:
    """``dropout`` is every attention's and MLP's, the decoder's included, in every head; training draws
    differ, evaluation is deterministic."""
    from perceivers.layers import Attention

    torch.manual_seed(0)
    model = create_model(name, tiny=True, dropout=0.25)
    for part in (model.perceiver.encoder, model.perceiver.decoder):
        attentions = [m for m in part.modules() if isinstance(m, Attention)]
        drops = [m for m in part.modules() if isinstance(m, torch.nn.Dropout)]
        assert attentions and drops, type(part).__name__
        assert all(m.dropout == 0.25 for m in attentions) and all(m.p == 0.25 for m in drops)
    with torch.no_grad():  # the flow decoder's zero-initialised output would hide any difference
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    args = _inputs(name, model)
    leaves = torch.utils._pytree.tree_leaves
    first, second = leaves(model.train()(*args).logits), leaves(model(*args).logits)
    assert any(not torch.equal(a, b) for a, b in zip(first, second))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(leaves(model(*args).logits), leaves(model(*args).logits), atol=0, rtol=0)


def test_list_models() -> None:
    assert list_models() == NAMES
    assert list_models("vision-*") == NAMES[5:]
    assert perceivers.list_models is list_models


def test_import_stays_light() -> None:
    code = ("import sys, perceivers; perceivers.create_model('language-perceiver', tiny=True); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'torchmetrics', 'transformers', 'matplotlib', 'jax', 'haiku')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", NAMES)
def test_official_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == model.pretrained_cfg.num_params


@pytest.mark.parametrize("name", NAMES)
def test_tiny_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, tiny=True)
    out = model(*_inputs(name, model))
    c = model.config
    if name.startswith("vision") or name == "language-perceiver-classifier":
        assert out.logits.shape == (2, c.num_labels)
        loss = out.logits.sum()
    elif name == "language-perceiver":
        assert out.logits.shape == (2, c.max_position_embeddings, c.vocab_size)
        loss = out.logits.sum()
    elif name == "language-perceiver-token-classifier":
        assert out.logits.shape == (2, c.max_position_embeddings, c.num_labels)
        loss = out.logits.sum()
    elif name == "optical-flow-perceiver":
        assert out.flow.shape == out.logits.shape == (2, *c.train_size, 2)
        torch.testing.assert_close(out.flow, out.logits * 20)
        loss = out.flow.sum()
    else:
        assert out.logits["image"].shape == (2, c.num_frames * c.image_size[0] * c.image_size[1], c.in_channels)
        assert out.logits["audio"].shape == (2, c.num_audio_samples)
        assert out.logits["label"].shape == (2, c.num_labels)
        loss = sum(v.sum() for v in out.logits.values())
    assert out.last_hidden_state.shape == (2, c.num_latents, c.d_latents)
    loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    if name == "multimodal-perceiver":  # mask_probs 0 / 0 / 1: these never reach the output
        unused = {"mask_tokens.audio", "mask_tokens.image", "padding.label"}
        assert no_grad == {f"perceiver.input_preprocessor.{n}.embeddings" for n in unused}
    else:
        assert not no_grad


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_json(name: str) -> None:
    model = create_model(name, tiny=True)
    config = json.loads(json.dumps(dataclasses.asdict(model.config)))
    again = create_model(model.model_name, **config)
    assert again.config == model.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_pretrained_metadata() -> None:
    cfg = model_entry("vision-perceiver-conv").pretrained
    assert cfg.haiku_url == "https://storage.googleapis.com/perceiver_io/imagenet_conv_preprocessing.pystate"
    assert cfg.hf_hub_id == "deepmind/vision-perceiver-conv" and cfg.metrics["imagenet_top1"] == 82.1
    model = create_model("optical-flow-perceiver", tiny=True)
    assert model.model_name == "optical-flow-perceiver" and model.pretrained_cfg.task == "optical-flow"


def test_errors_name_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'vision-perceiver'.*vision-perceiver-fourier"):
        create_model("vision-perceiver")
    with pytest.raises(TypeError, match="no field.*num_latent.*valid overrides:.*num_latents"):
        create_model("vision-perceiver-fourier", num_latent=3)
    with pytest.raises(ValueError, match="d_model=300 does not match.*261"):
        create_model("vision-perceiver-fourier", d_model=300, num_blocks=1, num_self_attends_per_block=1,
                     d_latents=8, num_latents=2, num_self_attention_heads=1)
    for name, arg in [("vision-perceiver-conv", "spatial_downsample"), ("vision-perceiver-learned", "spatial_downsample"),
                      ("multimodal-perceiver", "image_patch_size")]:
        with pytest.raises(ValueError, match=re.escape(f"{arg} must be an int >= 1, got 0")):
            create_model(name, tiny=True, **{arg: 0})


def test_official_defaults() -> None:
    with torch.device("meta"):
        fourier = create_model("vision-perceiver-fourier")
        learned = create_model("vision-perceiver-learned")
        conv = create_model("vision-perceiver-conv")
    assert fourier.perceiver.encoder.input_channels == 261
    assert conv.perceiver.encoder.input_channels == 322
    assert learned.perceiver.encoder.input_channels == 512
    assert fourier.perceiver.decoder.decoder.cross_attention.query_residual
    assert not learned.perceiver.decoder.decoder.cross_attention.query_residual  # the colab's setting


def test_image_models_sizes() -> None:
    fourier = create_model("vision-perceiver-fourier", tiny=True).eval()
    assert fourier(torch.randn(1, 3, 7, 15)).logits.shape == (1, 5)  # Fourier models take other sizes
    learned = create_model("vision-perceiver-learned", tiny=True)
    with pytest.raises(ValueError, match="built for index shape"):
        learned(torch.randn(1, 3, 7, 5))
    with pytest.raises(ValueError, match=r"\[batch, channels, height, width\]"):
        fourier(torch.randn(3, 7, 15))


def test_hidden_act_option_changes_numerics() -> None:
    torch.manual_seed(0)
    tanh = create_model("vision-perceiver-fourier", tiny=True).eval()
    erf = create_model("vision-perceiver-fourier", tiny=True, hidden_act="gelu").eval()
    erf.load_state_dict(tanh.state_dict())
    x = torch.randn(1, 3, 12, 10)
    with torch.no_grad():
        diff = (tanh(x).logits - erf(x).logits).abs().max()
    assert 0 < float(diff) < 0.1


def test_language_model_padding_and_loss() -> None:
    torch.manual_seed(0)
    model = create_model("language-perceiver", tiny=True).eval()
    ids = torch.randint(6, 262, (1, 16))
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[:, 10:] = 0
    full = model(ids, attention_mask=mask).logits
    short = model(input_ids=ids[:, :10]).logits
    torch.testing.assert_close(full[:, :10], short, rtol=1e-5, atol=1e-5)
    labels = torch.full((1, 10), -100)
    labels[0, 3] = 42
    out = model(ids[:, :10], labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits[0, 3:4], torch.tensor([42])))
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_optical_flow_checks_size() -> None:
    model = create_model("optical-flow-perceiver", tiny=True)
    with pytest.raises(ValueError, match="tile larger images"):
        model(torch.randn(1, 2, 3, 12, 16))


def test_multimodal_chunks_equal_full_decoding() -> None:
    torch.manual_seed(0)
    model = create_model("multimodal-perceiver", tiny=True).eval()
    (inputs,) = _inputs("multimodal-perceiver", model, batch=1)
    with torch.no_grad():
        full = model(inputs).logits
        recon = model.reconstruct(inputs, num_chunks=2)
        labelled = model(dict(inputs, label=torch.ones(1, 5))).logits  # the label is always masked
    c = model.config
    torch.testing.assert_close(recon["image"], full["image"].reshape(1, c.num_frames, *c.image_size, 3))
    torch.testing.assert_close(recon["audio"], full["audio"])
    torch.testing.assert_close(labelled["label"], full["label"])
    with pytest.raises(ValueError, match="do not divide"):
        next(model.subsampling_chunks(3))


def test_multimodal_chunks_encode_once() -> None:
    """``reconstruct`` ran the whole model, encoder included, once per chunk (the official colab's way: 128
    encoder passes for the same latents); it encodes once and gives each chunk what a forward pass gives it."""
    torch.manual_seed(0)
    model = create_model("multimodal-perceiver", tiny=True).eval()
    (inputs,) = _inputs("multimodal-perceiver", model, batch=2)
    calls = []
    model.perceiver.encoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        recon = model.reconstruct(inputs, num_chunks=4)
        assert len(calls) == 1
        per_chunk = [model(inputs, points).logits for points in model.subsampling_chunks(4)]
    c = model.config
    image = torch.cat([p["image"] for p in per_chunk], 1).reshape(2, c.num_frames, *c.image_size, 3)
    assert torch.equal(recon["image"], image)
    assert torch.equal(recon["audio"], torch.cat([p["audio"] for p in per_chunk], 1))
    assert torch.equal(recon["label"], per_chunk[-1]["label"])


def test_multimodal_exports_with_a_dynamic_batch() -> None:
    """The batch-size checks compare sizes pairwise: symbolic sizes cannot go into a set (unhashable)."""
    torch.manual_seed(0)
    model = create_model("multimodal-perceiver", tiny=True).eval()

    def inputs(batch: int) -> dict[str, torch.Tensor]:
        (x,) = _inputs("multimodal-perceiver", model, batch=batch)
        return dict(x, label=torch.zeros(batch, model.config.num_labels))

    batch = torch.export.Dim("batch", min=1, max=16)
    with torch.no_grad():
        exported = torch.export.export(model, (inputs(2),), dynamic_shapes=({m: {0: batch} for m in inputs(2)},))
        for size in (1, 5):
            x = inputs(size)
            torch.testing.assert_close(exported.module()(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    mixed = dict(inputs(2), audio=inputs(3)["audio"])
    with pytest.raises(ValueError, match=re.escape("share the batch size, got {'audio': 3, 'image': 2, 'label': 2}")):
        model(mixed)


@pytest.mark.parametrize("name,overrides", [
    ("language-perceiver", {}),
    ("language-perceiver", {"decoder_query_mask": False}),
    ("language-perceiver-classifier", {}),
    ("language-perceiver-token-classifier", {}),
])
def test_text_models_name_a_bad_attention_mask_as_given(name, overrides):
    # the mask is forwarded as the encoder's input_mask and the decoder's query_mask: the error must still name
    # the argument the caller passed (it said query_mask / input_mask, and suggested `query_mask == 0`)
    model = create_model(name, tiny=True, **overrides).eval()
    additive = torch.zeros(1, 8)
    additive[0, 5:] = float("-inf")
    with pytest.raises(ValueError, match=r"^attention_mask must hold only 0/1.*`attention_mask == 0`"):
        model(torch.randint(6, 262, (1, 8)), attention_mask=additive)
    with pytest.raises(TypeError, match=r"^attention_mask must be a torch.Tensor"):
        model(torch.randint(6, 262, (1, 8)), attention_mask=[[1] * 8])
