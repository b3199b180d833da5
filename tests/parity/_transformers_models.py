"""Tiny random transformers Perceiver heads, saved with ``save_pretrained``, for the parity tests.

Shared by test_transformers.py (checkpoint conversion) and test_transformers_api.py (transformers'
calling convention). transformers is a test dependency: import this module after
``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

import json
import shutil

import torch
import transformers

TRUNK = {"num_latents": 8, "d_latents": 32, "num_blocks": 2, "num_self_attends_per_block": 2,
         "num_self_attention_heads": 2, "num_cross_attention_heads": 1, "attention_probs_dropout_prob": 0.0}

_TEXT = {"num_latents": 6, "d_latents": 24, "num_blocks": 1, "num_self_attends_per_block": 2,
         "num_self_attention_heads": 2, "num_cross_attention_heads": 2, "qk_channels": 8,
         "v_channels": 24, "d_model": 16, "max_position_embeddings": 16}

#: the six heads with a registered DeepMind model
CONFIGS = {
    "PerceiverForMaskedLM": dict(_TEXT),
    "PerceiverForImageClassificationLearned": dict(TRUNK, image_size=6, num_labels=5),
    "PerceiverForImageClassificationFourier": dict(TRUNK, num_labels=5),
    "PerceiverForImageClassificationConvProcessing": dict(TRUNK, num_labels=5),
    "PerceiverForOpticalFlow": dict(TRUNK, train_size=(6, 8), num_self_attention_heads=4),
    "PerceiverForMultimodalAutoencoding": dict(TRUNK, num_frames=2, audio_samples_per_frame=16, samples_per_patch=8,
                                               image_size=2, output_shape=(1, 2, 8, 8), num_labels=5,
                                               output_num_channels=10, _label_trainable_num_channels=12),
}

#: every head, transformers' sequence classifier included
ALL_CONFIGS = {**CONFIGS, "PerceiverForSequenceClassification": dict(_TEXT, num_blocks=2, num_labels=3)}


def randomize(model, seed=0):
    """Every float tensor random: norms near 1, biases small, weights fan-in scaled, running variances > 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(0.5 + noise.abs())
            elif "norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.3 * noise)
            elif name.endswith(("bias", "running_mean")):
                t.copy_(0.3 * noise)
            elif t.ndim >= 2 and not any(w in name for w in ("latents", "position", "padding", "mask")):
                t.copy_(noise / t[0].numel() ** 0.5)
            else:
                t.copy_(noise)
    return model


def checkpoint_factory(tmp_path_factory, configs=None):
    """``make(arch)`` → (transformers model in eval mode, directory it was saved to), built once per arch.

    ``configs`` (default :data:`ALL_CONFIGS`) maps each head to its ``PerceiverConfig`` fields.
    Wrap it in a module-scoped fixture: ``hf_checkpoint = fixture(checkpoint_factory)``.
    """
    configs = ALL_CONFIGS if configs is None else configs
    cache = {}

    def make(arch):
        if arch not in cache:
            torch.manual_seed(0)
            model = getattr(transformers, arch)(transformers.PerceiverConfig(**configs[arch]))
            randomize(model.eval())
            directory = tmp_path_factory.mktemp(arch)
            model.save_pretrained(directory)
            cache[arch] = (model, directory)
        return cache[arch]

    return make


def edited_copy(directory, target, **fields):
    """A copy of the checkpoint ``directory`` at ``target`` whose ``config.json`` has ``fields`` set."""
    shutil.copytree(directory, target, dirs_exist_ok=True)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **fields}))
    return target


def inputs(arch, seed=1):
    """Keyword inputs of transformers' head ``arch`` for its tiny config (batch 2; multimodal 1)."""
    g = torch.Generator().manual_seed(seed)
    if arch in ("PerceiverForMaskedLM", "PerceiverForSequenceClassification"):
        return {"inputs": torch.randint(0, 262, (2, 16), generator=g), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    if arch.endswith("Learned"):
        return {"pixel_values": torch.randn(2, 3, 6, 6, generator=g)}
    if arch.endswith("Fourier"):
        return {"pixel_values": torch.randn(2, 3, 12, 10, generator=g)}
    if arch.endswith("ConvProcessing"):
        return {"pixel_values": torch.randn(2, 3, 16, 20, generator=g)}
    if arch == "PerceiverForOpticalFlow":
        return {"inputs": torch.randn(2, 2, 27, 6, 8, generator=g)}
    return {"inputs": {"image": torch.rand(1, 2, 3, 8, 8, generator=g),
                       "audio": torch.rand(1, 32, 1, generator=g) * 2 - 1,
                       "label": torch.zeros(1, 5)}}
