"""PatchPerceiver (the Keras tutorial's patch + learned-position Perceiver)."""

from __future__ import annotations

import pytest
import torch

from perceivers.models.patch import PatchPerceiver

TINY = {"image_size": 8, "patch_size": 2, "input_channels": 3, "num_classes": 5, "num_latents": 4,
        "latent_dim": 16, "latent_heads": 2, "latent_dim_head": 8, "num_blocks": 2, "num_iterations": 2}


def test_shapes_and_backward():
    model = PatchPerceiver(**TINY)
    x = torch.randn(3, 8, 8, 3, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, 5)
    logits.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    assert model(x, return_embeddings=True).shape == (3, 4, 16)


def test_patches_are_row_major_with_channels_last():
    model = PatchPerceiver(**{**TINY, "image_size": (4, 6), "input_channels": 1})
    x = torch.arange(24.0).reshape(1, 4, 6, 1)
    patches = model.patchify(x)
    assert patches.shape == (1, 6, 4)
    assert patches[0, 0].tolist() == [0, 1, 6, 7] and patches[0, 1].tolist() == [2, 3, 8, 9]
    assert model.grid_shape == (2, 3)


def test_iterations_share_weights():
    one = PatchPerceiver(**{**TINY, "num_iterations": 1})
    three = PatchPerceiver(**{**TINY, "num_iterations": 3})
    assert sum(p.numel() for p in one.parameters()) == sum(p.numel() for p in three.parameters())
    three.load_state_dict(one.state_dict())
    one.eval(), three.eval()
    x = torch.randn(2, 8, 8, 3)
    assert not torch.allclose(one(x), three(x))  # the shared stack really runs three times


def test_keras_sizes():
    model = PatchPerceiver()  # defaults: the tutorial's CIFAR-100 model
    assert model.num_patches == 1024 and model.patch_proj.in_features == 12
    assert model.position.embeddings.shape == (1024, 256) and model.latents.shape == (256, 256)
    assert len(model.blocks) == 4 and model.blocks[0].attn.num_heads == 8
    assert model.blocks[0].attn.to_q.out_features == 8 * 256


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="must divide image_size"):
        PatchPerceiver(**{**TINY, "patch_size": 3})
    model = PatchPerceiver(**TINY)
    with pytest.raises(ValueError, match=r"takes images \[batch, 8, 8, 3\]"):
        model(torch.randn(1, 16, 16, 3))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 8, 8, 1))


@pytest.mark.parametrize(("name", "value"), [
    ("num_latents", 0), ("latent_dim", 0), ("latent_heads", 0), ("latent_dim_head", 0), ("patch_dim", 0),
    ("cross_heads", 0), ("input_channels", 0), ("num_iterations", True), ("mlp_mult", 0),
    ("classifier_hidden", 0), ("num_blocks", -1), ("num_classes", 0),
])
def test_bad_sizes_are_refused_at_construction(name, value):
    """num_latents=0 built a model with NaN logits, input_channels=0 one that ignores its input, and zero widths
    failed in forward with a ZeroDivisionError."""
    with pytest.raises(ValueError, match=rf"{name} must be an int >= -?\d, got {value!r}"):
        PatchPerceiver(**{**TINY, name: value})


@pytest.mark.parametrize("value", [8.5, "8", (8, 8, 8), (8.0, 8)])
def test_image_size_must_be_whole_numbers(value):
    with pytest.raises(ValueError, match=r"image_size must be a positive int or \(height, width\)"):
        PatchPerceiver(**{**TINY, "image_size": value})


def test_images_of_another_dtype_name_both_dtypes():
    """float64 images into a float32 model failed inside the patch projection ("mat1 and mat2 must have the same
    dtype"); now the message names both dtypes and the ways out, as the other models' does. Autocast is fine."""
    model = PatchPerceiver(**TINY).eval()
    x = torch.randn(2, 8, 8, 3)
    with pytest.raises(TypeError, match=r"images has dtype torch.float64 but the model's parameters are torch.float32"):
        model(x.double())
    with torch.autocast("cpu", torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
    assert model.double()(x.double()).dtype == torch.float64
