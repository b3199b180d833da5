"""JOBR0/PerceiverIO_Pytorch's task classes, on our task models.

Code written against JOBR0's git-clone-only port keeps its class names, constructor arguments and
calls; only the import changes::

    from perceiver_io.flow_perceiver import FlowPerceiver   # JOBR0
    from perceivers.jobr0 import FlowPerceiver             # the same calls and outputs

    model = FlowPerceiver(img_size=(368, 496))
    model.load_state_dict(torch.load("optical_flow_checkpoint.pth")["model_state_dict"])
    flow = model(image1, image2, test_mode=True)           # [N, 2, H, W]

Each class holds one task model (``.model``: :class:`~perceivers.tasks.ImageClassifier`,
:class:`~perceivers.tasks.MaskedLanguageModel`, :class:`~perceivers.tasks.OpticalFlowModel`,
:class:`~perceivers.tasks.MultimodalAutoencoder`) and translates JOBR0's signatures to it; none computes
anything of its own. ``load_state_dict`` takes JOBR0's state dicts (renamed strictly by
:func:`perceivers.convert.jobr0.convert_jobr0_state_dict`), the wrapper's own, and the inner task model's;
``load_haiku_params`` reads DeepMind's Haiku pickles, as JOBR0's method of that name does.

Numerics: JOBR0's MLPs use the exact erf GELU, DeepMind's the tanh approximation. These classes build
their models with ``hidden_act="gelu"``, so they give JOBR0's outputs; pass ``hidden_act="gelu_tanh"``
for DeepMind's. Keyword arguments beyond JOBR0's are fields of our task configs (for the sizes JOBR0
hard-codes, e.g. ``num_latents=8``); see docs/jobr0.md for the table and the differences.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .convert.jobr0 import convert_jobr0_state_dict, is_jobr0_state_dict
from .data.flow import flow_model_fn, tile_flow
from .tasks.common import as_pair
from .tasks.optical_flow import OpticalFlowConfig
from .tasks.registry import create_model
from .validation import check_tensor

__all__ = ["ClassificationPerceiver", "FlowPerceiver", "LanguagePerceiver", "MultiModalPerceiver", "PrepType"]


class PrepType(enum.Enum):
    """JOBR0's ImageNet preprocessing choices (``perceiver_io.classification_perceiver.PrepType``)."""

    FOURIER_POS_CONVNET = 1
    LEARNED_POS_1X1CONV = 2
    FOURIER_POS_PIXEL = 3


# PrepType → (our variant, the Fourier max_resolution JOBR0 hard-codes whatever img_size is).
_IMAGENET = {
    PrepType.FOURIER_POS_CONVNET: ("vision-perceiver-conv", (56, 56)),
    PrepType.LEARNED_POS_1X1CONV: ("vision-perceiver-learned", None),
    PrepType.FOURIER_POS_PIXEL: ("vision-perceiver-fourier", (224, 224)),
}


class _JOBR0Model(nn.Module):
    """One of our task models (``self.model``) behind JOBR0's call signature."""

    model: nn.Module

    def __init__(self, variant: str, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = create_model(variant, **{"hidden_act": "gelu", **config})

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a JOBR0 ``model_state_dict``, this wrapper's own state dict, or the task model's.

        A JOBR0 state dict is renamed and checked tensor by tensor; one that does not fit these sizes
        raises :class:`~perceivers.convert.state_dict.CheckpointError` (a ``ValueError``) naming every
        missing, unexpected and mis-shaped tensor. It is always loaded strictly.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
        if "model_state_dict" in state_dict and not isinstance(state_dict["model_state_dict"], Tensor):
            raise ValueError("got a whole JOBR0 checkpoint; pass its state dict: "
                             "model.load_state_dict(torch.load(path)['model_state_dict'])")
        if is_jobr0_state_dict(state_dict):
            if not strict:
                raise ValueError("a JOBR0 state dict is converted strictly (every tensor renamed and checked); "
                                 "strict=False is not supported for it")
            converted = convert_jobr0_state_dict(state_dict, self.model)
            return self.model.load_state_dict(converted, strict=True, assign=assign)
        if state_dict and all(k.startswith("model.") for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def load_haiku_params(self, file: str | os.PathLike[str]) -> None:
        """Load DeepMind's official Haiku checkpoint (``.pystate`` / ``.pickle``), strictly
        (:func:`perceivers.convert.haiku.load_haiku_checkpoint`; unpickled without running code)."""
        from .convert.haiku import load_haiku_checkpoint

        load_haiku_checkpoint(self.model, file)


def _prep_type(value: PrepType | str) -> PrepType:
    if isinstance(value, PrepType):
        return value
    if isinstance(value, str) and value.upper() in PrepType.__members__:
        return PrepType[value.upper()]
    raise ValueError(f"prep_type must be one of {[f'PrepType.{p.name}' for p in PrepType]}, got {value!r}")


class ClassificationPerceiver(_JOBR0Model):
    """JOBR0's ImageNet classifier: ``img [B, 3, H, W]`` → logits ``[B, num_classes]``.

    Args:
        num_classes: classes (1000 for the official checkpoints).
        img_size: ``(H, W)`` of the inputs (an int for square images).
        prep_type: :class:`PrepType` (or its name): ``FOURIER_POS_CONVNET`` (conv stem, Fourier
            features with max resolution 56), ``LEARNED_POS_1X1CONV`` (1×1 conv, learned positions) or
            ``FOURIER_POS_PIXEL`` (pixels, Fourier features with max resolution 224).
        **config: fields of :class:`~perceivers.tasks.image_classification.ImageClassificationConfig`
            (``num_latents``, ``d_latents``, ``max_resolution``, ``hidden_act``, …).
    """

    def __init__(self, num_classes: int = 1000, img_size: int | Sequence[int] = (224, 224),
                 prep_type: PrepType | str = PrepType.FOURIER_POS_CONVNET, **config: Any) -> None:
        self.prep_type = _prep_type(prep_type)
        self.img_size = as_pair(img_size)
        variant, max_resolution = _IMAGENET[self.prep_type]
        defaults: dict[str, Any] = {"num_labels": num_classes, "image_size": self.img_size}
        if max_resolution is not None:
            defaults["max_resolution"] = max_resolution
        super().__init__(variant, {**defaults, **config})

    def forward(self, img: Tensor) -> Tensor:
        """``img [B, 3, H, W]`` (channels first, normalised as JOBR0's examples do) → logits ``[B, num_classes]``."""
        want = (self.model.config.in_channels, *self.img_size)
        layout = f"[batch, {', '.join(map(str, want))}]"
        check_tensor(img, "img", kind="float", ndim=4, layout=layout)
        if tuple(img.shape[1:]) != want:
            raise ValueError(f"img must be {layout} (channels first, img_size={self.img_size}), got "
                             f"{tuple(img.shape)}")
        return self.model(img).logits


class LanguagePerceiver(_JOBR0Model):
    """JOBR0's masked byte language model: ``inputs [B, L]`` → logits ``[B, L, vocab_size]``.

    Args:
        vocab_size: 262 (256 bytes + 6 special ids).
        max_seq_len: the longest input (2048); shorter inputs use the first ``L`` positions.
        latent_channels: latent width (also the encoder's value width, as in JOBR0).
        embed_dim: byte embedding and decoder query width.
        **config: fields of :class:`~perceivers.tasks.language.MaskedLanguageModelConfig`.
    """

    def __init__(self, vocab_size: int = 262, max_seq_len: int = 2048, latent_channels: int = 1280,
                 embed_dim: int = 768, **config: Any) -> None:
        self.max_seq_len = max_seq_len
        super().__init__("language-perceiver", {
            "vocab_size": vocab_size, "max_position_embeddings": max_seq_len, "d_latents": latent_channels,
            "v_channels": latent_channels, "d_model": embed_dim, **config})

    def forward(self, inputs: Tensor, input_masks: Tensor) -> Tensor:
        """``inputs [B, L]`` byte ids, ``input_masks [B, L]`` (True/1 = real token) → logits ``[B, L, vocab]``.

        As in JOBR0, the mask is both the encoder's input mask and the decoder's query mask (padded
        positions decode from zero attention).
        """
        check_tensor(inputs, "inputs", kind="int", ndim=2, layout="[batch, length] token ids")
        if inputs.shape[1] > self.max_seq_len:
            raise ValueError(f"inputs may have at most max_seq_len={self.max_seq_len} tokens, got {inputs.shape[1]}")
        check_tensor(input_masks, "input_masks", kind=None, layout=f"{list(inputs.shape)} (True/1 = real token)")
        if tuple(input_masks.shape) != tuple(inputs.shape):
            raise ValueError(f"input_masks must have the shape of inputs {tuple(inputs.shape)}, got "
                             f"{tuple(input_masks.shape)}")
        return self.model(inputs, attention_mask=input_masks).logits


class FlowPerceiver(_JOBR0Model):
    """JOBR0's optical flow model: two frames ``[N, 3, H, W]`` → flow ``[N, 2, H, W]`` in pixels.

    Args:
        img_size: ``(H, W)`` of the training images (368×496); larger images need ``test_mode``.
        flow_scale_factor: multiplies the decoder's raw output (JOBR0: 20/100 = 0.2, i.e. DeepMind's
            ÷100 rescale and ×20 ``FLOW_SCALE_FACTOR``).
        n_latents, num_latent_channels, n_self_attends: the latent array and the self-attention layers.
        mixed_precision: run the model under CUDA autocast (inputs on a CUDA device only, as JOBR0's
            ``torch.cuda.amp.autocast``).
        **config: fields of :class:`~perceivers.tasks.optical_flow.OpticalFlowConfig`.
    """

    def __init__(self, img_size: int | Sequence[int] = (368, 496), flow_scale_factor: float = 20 / 100,
                 n_latents: int = 2048, num_latent_channels: int = 512, n_self_attends: int = 24,
                 mixed_precision: bool = False, **config: Any) -> None:
        self.H, self.W = as_pair(img_size)
        self.mixed_precision = mixed_precision
        # Our model divides the raw output by rescale_factor, then multiplies by its flow_scale_factor.
        rescale = config.get("rescale_factor", OpticalFlowConfig.rescale_factor)
        super().__init__("optical-flow-perceiver", {
            "train_size": (self.H, self.W), "num_latents": n_latents, "d_latents": num_latent_channels,
            "num_self_attends_per_block": n_self_attends, "flow_scale_factor": flow_scale_factor * rescale,
            **config})

    def _flow(self, pairs: Tensor) -> Tensor:
        """``[N, 2, 3, H, W]`` at the training size → flow ``[N, H, W, 2]``."""
        with torch.autocast("cuda", enabled=self.mixed_precision and pairs.is_cuda):
            return self.model(pairs).flow

    def forward(self, image1: Tensor, image2: Tensor, test_mode: bool = False, min_overlap: int = 20) -> Tensor:
        """Flow from ``image1`` to ``image2``.

        Args:
            image1, image2: ``[N, 3, H, W]`` frames normalised to [−1, 1], at least the training size.
            test_mode: images of any size at least the training size: flow predicted on training-size
                tiles overlapping by at least ``min_overlap`` pixels, blended with weights that fall off
                towards the tile borders (:func:`perceivers.data.flow.tile_flow`; run without gradients).
                Otherwise the images must be exactly the training size.
            min_overlap: the tiles' minimum overlap in pixels (smaller than the training size).

        Returns:
            flow ``[N, 2, H, W]`` (``(dx, dy)`` in pixels).
        """
        layout = "[batch, 3, height, width] (channels first)"
        for name, image in (("image1", image1), ("image2", image2)):
            check_tensor(image, name, kind="float", ndim=4, layout=layout)
            if image.shape[1] != 3:
                raise ValueError(f"{name} must be {layout}, got {tuple(image.shape)}")
        if image1.shape != image2.shape:
            raise ValueError(f"image1 and image2 must have the same shape, got {tuple(image1.shape)} and "
                             f"{tuple(image2.shape)}")
        height, width = image1.shape[-2:]
        if height < self.H or width < self.W:
            raise ValueError(f"images must be at least img_size {(self.H, self.W)}, got {(height, width)}; pad or "
                             "resize them")
        if not test_mode:
            if (height, width) != (self.H, self.W):
                raise ValueError(f"images must be img_size {(self.H, self.W)} unless test_mode=True, got "
                                 f"{(height, width)}")
            flow = self._flow(torch.stack((image1, image2), dim=1))
            return rearrange(flow, "n h w c -> n c h w")
        run = flow_model_fn(self.model)

        def tile(pairs: Tensor) -> Tensor:
            with torch.autocast("cuda", enabled=self.mixed_precision and image1.is_cuda):
                return run(pairs)

        frames = [rearrange(x, "n c h w -> n h w c") for x in (image1, image2)]
        flow = tile_flow(tile, *frames, tile_size=(self.H, self.W), min_overlap=min_overlap, normalized=True)
        return rearrange(flow, "n h w c -> n c h w").to(image1.device)


class MultiModalPerceiver(_JOBR0Model):
    """JOBR0's Kinetics-700 video autoencoder: video + audio → their reconstruction and class logits.

    Args:
        img_size: ``(H, W)`` of the frames; img_channels: their channels.
        num_frames: frames per clip (16).
        num_classes: label classes (700).
        audio_samples_per_frame: audio samples per video frame (48000 // 25).
        audio_samples_per_patch: audio samples per token (16).
        num_latent_channels: latent width (512).
        **config: fields of :class:`~perceivers.tasks.multimodal.MultimodalAutoencodingConfig`.
    """

    def __init__(self, img_size: int | Sequence[int] = (224, 224), img_channels: int = 3, num_frames: int = 16,
                 num_classes: int = 700, audio_samples_per_frame: int = 48000 // 25, audio_samples_per_patch: int = 16,
                 num_latent_channels: int = 512, **config: Any) -> None:
        self.H, self.W = as_pair(img_size)
        self.num_classes = num_classes
        self.audio_samples_per_frame = audio_samples_per_frame
        self.audio_samples_per_patch = audio_samples_per_patch
        super().__init__("multimodal-perceiver", {
            "image_size": (self.H, self.W), "in_channels": img_channels, "num_frames": num_frames,
            "num_labels": num_classes, "audio_samples_per_frame": audio_samples_per_frame,
            "samples_per_patch": audio_samples_per_patch, "d_latents": num_latent_channels, **config})

    def forward(self, images: Tensor, audio: Tensor, n_chunks: int = 128) -> dict[str, Tensor]:
        """Autoencode a clip, decoding the outputs in ``n_chunks`` slices (JOBR0's chunked loop).

        Args:
            images: ``[B, T, C, H, W]`` frames in [0, 1] (channels first per frame).
            audio: ``[B, N, 1]`` (or ``[B, N]``) samples in [−1, 1], ``N = T · audio_samples_per_frame``.
            n_chunks: slices of the ``T·H·W`` image and ``N / audio_samples_per_patch`` audio outputs
                decoded per pass (the model is run once per slice); must divide both counts.

        Returns:
            ``{"image": images.shape, "audio": audio.shape, "label": [B, num_classes]}``: the
            reconstructed video and audio and the class logits (every slice's logits are the same:
            decoder queries do not interact; the last slice's are returned, as JOBR0 does).
        """
        c = self.model.config
        want = (c.num_frames, c.in_channels, *c.image_size)
        layout = f"[batch, {', '.join(map(str, want))}]"
        check_tensor(images, "images", kind="float", ndim=5, layout=layout + " (frames, channels, H, W)")
        if tuple(images.shape[1:]) != want:
            raise ValueError(f"images must be {layout} (frames, channels, H, W), got {tuple(images.shape)}")
        audio_layout = f"[batch, {c.num_audio_samples}, 1] or [batch, {c.num_audio_samples}]"
        check_tensor(audio, "audio", kind="float", ndim=(2, 3), layout=audio_layout)
        if audio.shape[1] != c.num_audio_samples or (audio.ndim == 3 and audio.shape[2] != 1):
            raise ValueError(f"audio must be {audio_layout}, got {tuple(audio.shape)}")
        if isinstance(n_chunks, bool) or not isinstance(n_chunks, int):
            raise TypeError(f"n_chunks must be an int, got {type(n_chunks).__name__}")
        if n_chunks < 1:
            raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
        out = self.model.decode_in_chunks({"image": images, "audio": audio}, n_chunks)
        return {"image": rearrange(out["image"], "b t h w c -> b t c h w"), "audio": out["audio"].reshape(audio.shape),
                "label": out["label"]}
