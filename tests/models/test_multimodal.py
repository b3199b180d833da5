"""MultiModalityPerceiver: shapes, masks, missing modalities, tying, input checks (tiny models)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from perceivers import InputModality, InputModalityWithEmbedding, MultiModalityPerceiver
from perceivers.models.multimodal import (
    MultiModalityPerceiverNoPooling,
    MultiModalityWithTextPerceiver,
    latent_block_schedule,
    log_spaced_fourier_features,
)

IMAGE = InputModality("image", input_channels=3, input_axis=2, num_freq_bands=3, max_freq=8.0)
AUDIO = InputModality("audio", input_channels=1, input_axis=1, num_freq_bands=2, max_freq=6.0)
SMALL = {"num_latents": 4, "latent_dim": 16, "cross_heads": 2, "latent_heads": 2, "cross_dim_head": 8,
         "latent_dim_head": 8}


def _model(**kwargs) -> MultiModalityPerceiver:
    return MultiModalityPerceiver(modalities=[IMAGE, AUDIO], **{"depth": 2, **SMALL, **kwargs}).eval()


def _inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(batch, 3, 4, 3), "audio": torch.randn(batch, 5, 1)}


def test_widths_follow_the_fork() -> None:
    """image K=6, 2 axes, 3 channels → 29; audio K=6, 1 axis → 14; common width 29 + 2 one-hot = 31."""
    image = InputModality("image", 3, 2, 6, 10.0)
    audio = InputModality("audio", 1, 1, 6, 10.0)
    assert (image.input_dim, audio.input_dim) == (29, 14)
    model = MultiModalityPerceiver(modalities=[image, audio], depth=1, **SMALL)
    assert model.context_dim == 31


def test_log_spaced_bands_start_at_base() -> None:
    """max_freq 10, 6 bands, base 2: scales 2 … 5 (log-spaced), then the raw coordinate."""
    x = torch.tensor([[0.5]])
    feats = log_spaced_fourier_features(x, num_bands=6, max_freq=10.0, base=2)
    scales = 2 ** torch.linspace(1, math.log2(5), 6)
    expected = torch.cat([(math.pi * 0.5 * scales).sin(), (math.pi * 0.5 * scales).cos(), torch.tensor([0.5])])
    torch.testing.assert_close(feats[0], expected)
    assert feats.shape == (1, 13)


def test_output_shapes() -> None:
    x = _inputs()
    assert _model(num_classes=7)(x).shape == (2, 7)
    assert _model()(x).shape == (2, 16)  # num_classes=None: pooled embeddings, not a crash
    assert _model(num_classes=7)(x, return_embeddings=True).shape == (2, 4, 16)
    no_pool = MultiModalityPerceiverNoPooling(modalities=[IMAGE, AUDIO], depth=2, **SMALL)
    assert no_pool(x).shape == (2, 4, 16)
    assert not any(k.startswith("head.") for k in no_pool.state_dict())


def test_backward_reaches_every_parameter(randomize) -> None:
    model = randomize(_model(num_classes=3, num_latent_blocks_per_layer=2)).train()
    model(_inputs()).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_the_forks_no_pooling_recipe_through_to_logits() -> None:
    """The fork's README subclass: ``self.to_logits = nn.Identity()`` and an identity ``pool`` give the latents."""

    class NoPooling(MultiModalityPerceiver):
        def __init__(self, **kwargs) -> None:
            super().__init__(num_classes=1, **kwargs)
            self.to_logits = nn.Identity()

        def pool(self, x: torch.Tensor) -> torch.Tensor:
            return x

    torch.manual_seed(0)
    model = NoPooling(modalities=[IMAGE, AUDIO], depth=2, **{k: v for k, v in SMALL.items() if k != "num_classes"}).eval()
    inputs = _inputs()
    assert model.to_logits is model.head and isinstance(model.head, nn.Identity)
    torch.testing.assert_close(model(inputs), model(inputs, return_embeddings=True))


def test_tying_pattern() -> None:
    """Tied: cross layers (0, 1, 1); latent block 0 per layer, blocks 1.. shared by all layers."""
    assert latent_block_schedule(3, 2, True) == ((0, 1), (2, 1), (3, 1))
    assert latent_block_schedule(2, 2, False) == ((0, 1), (2, 3))
    tied = _model(depth=3, weight_tie_layers=True, num_latent_blocks_per_layer=2)
    assert tied.cross_order == (0, 1, 1)
    assert len(tied.cross_blocks) == 2 and len(tied.latent_blocks) == 4
    untied = _model(depth=3, num_latent_blocks_per_layer=2)
    assert len(untied.cross_blocks) == 3 and len(untied.latent_blocks) == 6


def test_missing_modality_keeps_encoding_of_others(randomize) -> None:
    """The one-hot code follows the declared modalities, so dropping one leaves the others' tokens unchanged."""
    model = randomize(_model(num_classes=3))
    x = _inputs()
    (both,), _ = model.build_context(x)
    (image_only,), _ = model.build_context({"image": x["image"]})
    n_audio = x["audio"].shape[1]  # sorted names: audio tokens come first
    torch.testing.assert_close(image_only, both[:, n_audio:], rtol=0, atol=0)
    # One-hot code: image is modality 1 of 2 in both cases.
    assert image_only[..., -2:].eq(torch.tensor([0.0, 1.0])).all()


VIDEO = InputModality("video", input_channels=2, input_axis=3, num_freq_bands=1, max_freq=4.0, freq_base=3)
THREE = {"audio": (2, 5, 1), "image": (2, 3, 4, 3), "video": (2, 2, 2, 2, 2)}


@given(present=st.sets(st.sampled_from(sorted(THREE)), min_size=1))
def test_any_subset_keeps_token_encodings(present: set[str]) -> None:
    """Property: for every subset of the declared modalities, each present modality's tokens are exactly its
    slice of the all-modalities context."""
    model = MultiModalityPerceiver(modalities=[VIDEO, IMAGE, AUDIO], depth=1, **SMALL)
    gen = torch.Generator().manual_seed(0)
    full = {name: torch.randn(shape, generator=gen) for name, shape in THREE.items()}
    (everything,), _ = model.build_context(full)
    (subset,), _ = model.build_context({name: full[name] for name in present})
    offsets, start = {}, 0
    for name in sorted(THREE):
        n = math.prod(THREE[name][1:-1])
        offsets[name] = (start, start + n)
        start += n
    expected = torch.cat([everything[:, slice(*offsets[name])] for name in sorted(present)], dim=1)
    torch.testing.assert_close(subset, expected, rtol=0, atol=0)


def test_missing_modality_equals_fully_masked_modality(randomize) -> None:
    model = randomize(_model(num_classes=3, depth=3, weight_tie_layers=True))
    x = _inputs()
    with torch.no_grad():
        absent = model({"image": x["image"]})
        masked = model(x, masks={"audio": torch.zeros(2, 5, dtype=torch.bool)})
    torch.testing.assert_close(absent, masked, atol=1e-5, rtol=1e-5)


def test_per_modality_masks_match_concatenated_mask(randomize) -> None:
    model = randomize(_model(num_classes=3))
    x = _inputs()
    image_mask = torch.rand(2, 3, 4) > 0.4  # the image's axes
    image_mask[:, 0, 0] = True
    audio_mask = torch.rand(2, 5) > 0.4
    with torch.no_grad():
        per_modality = model(x, masks={"image": image_mask, "audio": audio_mask})
        concatenated = model(x, mask=torch.cat([audio_mask, image_mask.flatten(1)], dim=1))  # sorted: audio, image
        only_image = model(x, masks={"image": image_mask})
        image_and_all_audio = model(x, masks={"image": image_mask, "audio": torch.ones(2, 5, dtype=torch.bool)})
    torch.testing.assert_close(per_modality, concatenated, rtol=0, atol=0)
    torch.testing.assert_close(only_image, image_and_all_audio, rtol=0, atol=0)


def test_masked_tokens_do_not_matter(randomize) -> None:
    model = randomize(_model(num_classes=3))
    x = _inputs()
    audio_mask = torch.tensor([[True, False, True, False, True]] * 2)
    y = {**x, "audio": x["audio"].masked_fill(~audio_mask[..., None], 123.0)}
    with torch.no_grad():
        torch.testing.assert_close(model(x, masks={"audio": audio_mask}), model(y, masks={"audio": audio_mask}))


def test_mask_errors() -> None:
    model = _model()
    x = _inputs()
    with pytest.raises(ValueError, match="not both"):
        model(x, mask=torch.ones(2, 17, dtype=torch.bool), masks={"audio": torch.ones(2, 5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="video"):
        model(x, masks={"video": torch.ones(2, 5, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"masks\['audio'\].*\[batch=2, 5\]"):
        model(x, masks={"audio": torch.ones(2, 6, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"\[batch=2, 17\]"):
        model(x, mask=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.bool"):
        model(x, masks={"audio": torch.ones(2, 5)})
    with pytest.raises(ValueError, match=r"masks\['image'\].*\[batch=2, 3, 4\].*\[batch, 12\].*\(2, 4, 3\)"):
        model(x, masks={"image": torch.ones(2, 4, 3, dtype=torch.bool)})  # 12 elements, not the image's axes


def test_input_errors_name_expected_and_actual() -> None:
    model = _model()
    x = _inputs()
    with pytest.raises(ValueError, match=r"unknown modality \['video'\].*\['audio', 'image'\]"):
        model({**x, "video": torch.randn(2, 2, 2, 2, 3)})
    with pytest.raises(ValueError, match=r"'image'.*3 channels.*got 2"):
        model({**x, "image": torch.randn(2, 3, 4, 2)})
    with pytest.raises(ValueError, match=r"'audio'.*input_axis=1.*got 4 dims"):
        model({**x, "audio": torch.randn(2, 5, 2, 1)})
    with pytest.raises(ValueError, match="batch size"):
        model({**x, "audio": torch.randn(3, 5, 1)})
    with pytest.raises(ValueError, match="empty"):
        model({})
    with pytest.raises(TypeError, match="dict"):
        model(x["image"])
    with pytest.raises(TypeError, match="floating-point"):
        model({**x, "audio": torch.ones(2, 5, 1, dtype=torch.long)})


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="unique"):
        MultiModalityPerceiver(modalities=[IMAGE, IMAGE], depth=1, **SMALL)
    with pytest.raises(ValueError, match="at least one"):
        MultiModalityPerceiver(modalities=[], depth=1, **SMALL)
    with pytest.raises(ValueError, match="input_axis must be a positive int, got 0"):
        InputModality("x", 1, 0, 2, 4.0)
    with pytest.raises(ValueError, match="freq_base"):
        InputModality("x", 1, 1, 2, 4.0, freq_base=1)
    with pytest.raises(ValueError, match="input_axis=1"):
        InputModalityWithEmbedding("text", 1, 2, 2, 4.0, embedding=nn.Embedding(5, 4))


def _text_model(**kwargs) -> MultiModalityWithTextPerceiver:
    text = InputModalityWithEmbedding("text", 1, 1, 2, 10.0, embedding=nn.Embedding(11, 12))
    return MultiModalityWithTextPerceiver(
        modalities=[IMAGE, text], **{"depth": 3, "num_classes": 4, "num_latent_blocks_per_layer": 1, **SMALL,
                                     **kwargs}
    ).eval()


def test_text_model_slices_embedding_per_layer() -> None:
    model = _text_model()
    ids = torch.randint(0, 11, (2, 6, 1))
    contexts, _ = model.build_context({"image": torch.randn(2, 3, 4, 3), "text": ids})
    assert len(contexts) == 3
    emb = model.embeddings["text"].weight
    for i, ctx in enumerate(contexts):  # sorted: image (12 tokens) then text
        torch.testing.assert_close(ctx[:, 12:, :4], emb[ids[..., 0]][..., 4 * i:4 * (i + 1)])
    assert model({"image": torch.randn(2, 3, 4, 3), "text": ids[..., 0]}).shape == (2, 4)
    assert "embeddings.text.weight" in model.state_dict()


def test_text_model_input_errors() -> None:
    model = _text_model()
    with pytest.raises(TypeError, match="integer token ids"):
        model({"image": torch.randn(2, 3, 4, 3), "text": torch.randn(2, 6, 1)})
    with pytest.raises(ValueError, match=r"\[batch, length, 1\]"):
        model({"image": torch.randn(2, 3, 4, 3), "text": torch.zeros(2, 6, 2, dtype=torch.long)})


DOC = Path(__file__).resolve().parents[2] / "docs" / "multimodal.md"
DOC_BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL) if DOC.exists() else []


@pytest.mark.parametrize("block", range(len(DOC_BLOCKS)))
def test_docs_examples_run(block: int) -> None:
    """Every python block in docs/multimodal.md runs (they carry their own asserts)."""
    exec(compile(DOC_BLOCKS[block], f"{DOC}:block{block}", "exec"), {})  # noqa: S102 - our own docs


def test_save_and_load_round_trip(tmp_path, randomize) -> None:
    from perceivers.hub import from_pretrained, save_pretrained

    for i, model in enumerate([_model(num_classes=3, weight_tie_layers=True, num_latent_blocks_per_layer=2),
                               _text_model()]):
        model = randomize(model).eval()
        save_pretrained(model, tmp_path / str(i))
        loaded = from_pretrained(tmp_path / str(i))
        assert type(loaded) is type(model)
        x = _inputs() if i == 0 else {"image": torch.randn(2, 3, 4, 3), "text": torch.randint(0, 11, (2, 6, 1))}
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_float64_model_gets_float64_position_features() -> None:
    """The Fourier features were computed in float32 and cast, so a float64 model saw them rounded (6.8e-6 off at
    64×64, K=6, max_freq=64), unlike perceivers.Perceiver and the variants, which compute them in float64."""
    image = InputModality("image", input_channels=1, input_axis=2, num_freq_bands=6, max_freq=64.0)
    model = MultiModalityPerceiver(modalities=[image, AUDIO], depth=1, **SMALL).double()
    tokens = model._tokens("image", torch.zeros(1, 64, 64, 1, dtype=torch.float64))
    assert tokens.dtype == torch.float64
    pos = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 64, dtype=torch.float64)] * 2, indexing="ij"), -1)
    scales = 2 ** torch.linspace(1, math.log2(32), 6, dtype=torch.float64)
    angles = math.pi * pos[..., None] * scales  # [64, 64, 2, K]
    expected = torch.cat((angles.sin(), angles.cos(), pos[..., None]), dim=-1).reshape(64 * 64, -1)
    start = 1 + (model.context_dim - 2 - image.input_dim)  # data, then zero padding
    torch.testing.assert_close(tokens[0, :, start:start + image.position_channels], expected, rtol=0, atol=1e-12)
