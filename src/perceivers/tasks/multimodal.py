"""Kinetics-700 multimodal autoencoding (video + audio + label), the official 88× compression model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..io import (
    FourierQueries,
    MultimodalDecoder,
    PerceiverIOModel,
    TrainableQueries,
    build_position_encoding,
)
from ..io.processors import (
    AudioPostprocessor,
    AudioPreprocessor,
    ClassificationPostprocessor,
    ImagePreprocessor,
    MultimodalPostprocessor,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    ProjectionPostprocessor,
)
from ..outputs import TransformersIndexing, model_output
from ..validation import check_count, check_tensor
from .common import (
    LabelNames,
    SavesPretrained,
    TrunkConfig,
    as_pair,
    build_encoder,
    check_d_model,
    check_labels,
    check_unsupported,
    output_flags,
    set_attention_dropout,
    transformers_tuple,
)
from .pretrained import PretrainedCfg
from .registry import config_from_overrides, register_model

__all__ = ["MultimodalAutoencoder", "MultimodalAutoencodingConfig", "MultimodalAutoencodingOutput"]

MODALITIES = ("audio", "image", "label")


@dataclass
class MultimodalAutoencodingConfig(LabelNames, TrunkConfig):
    """Video ``[T, C, H, W]``, audio ``T · audio_samples_per_frame`` samples and a label, in one latent array.

    Attributes:
        num_frames, image_size, in_channels: the video.
        image_patch_size: space-to-depth block of the video encoder (4 → 56×56 tokens per frame).
        image_num_bands: 3-D Fourier bands of video inputs and queries (max resolution ``(T, H/p, W/p)``).
        audio_samples_per_frame, samples_per_patch: the audio and its patch size.
        audio_num_bands: 1-D Fourier bands (max resolution = number of samples).
        num_labels: classes of the label modality.
        label_query_channels: width of the trainable label query.
        output_num_channels: width of the shared decoder's output.
        min_padding_size, decoder_min_padding_size: learned padding channels (encoder / decoder).
        mask_probs: per-modality probability of replacing input tokens by a learned mask token
            (label 1.0: the label is never seen, the model classifies from video and audio).
        num_decoder_heads, decoder_query_residual: the shared decoder cross-attention.
        d_model: optional check of the padded input width (transformers' field; 704).
        labels: names of the label classes (``config.id2label`` / ``label2id``); ``None``: ``LABEL_i``.
    """

    num_latents: int = 784
    d_latents: int = 512
    num_self_attends_per_block: int = 8
    num_cross_attention_heads: int = 1
    num_frames: int = 16
    image_size: Any = (224, 224)
    in_channels: int = 3
    image_patch_size: int = 4
    image_num_bands: int = 32
    audio_samples_per_frame: int = 1920
    samples_per_patch: int = 16
    audio_num_bands: int = 192
    num_labels: int = 700
    label_query_channels: int = 1024
    output_num_channels: int = 512
    min_padding_size: int = 4
    decoder_min_padding_size: int = 2
    mask_probs: dict = field(default_factory=lambda: {"audio": 0.0, "image": 0.0, "label": 1.0})
    num_decoder_heads: int = 1
    decoder_query_residual: bool = False
    d_model: int | None = None
    labels: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.labels = check_labels(self.labels, self.num_labels)
        self.image_size = as_pair(self.image_size, "image_size")
        h, w = self.image_size
        check_count(image_patch_size=self.image_patch_size)
        if h % self.image_patch_size or w % self.image_patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by image_patch_size={self.image_patch_size}")
        if self.audio_samples_per_frame * self.num_frames % self.samples_per_patch:
            raise ValueError("num_frames · audio_samples_per_frame must be divisible by samples_per_patch")
        self.mask_probs = {k: float(v) for k, v in dict(self.mask_probs).items()}

    @property
    def num_audio_samples(self) -> int:
        return self.num_frames * self.audio_samples_per_frame

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        p = self.image_patch_size
        return (self.num_frames, self.image_size[0] // p, self.image_size[1] // p)

    @property
    def output_sizes(self) -> dict[str, int]:
        """Full number of decoder queries per modality."""
        h, w = self.image_size
        return {"audio": self.num_audio_samples // self.samples_per_patch, "image": self.num_frames * h * w, "label": 1}


@model_output
@dataclass
class MultimodalAutoencodingOutput(TransformersIndexing):
    """Attributes:
        logits: ``{"audio": [B, Qa · samples_per_patch], "image": [B, Qi, C], "label": [B, num_labels]}`` for the
            decoded (possibly subsampled) points.
        last_hidden_state: the latents ``[B, N, D]``.
        loss: always ``None`` (transformers' field; no built-in training loss).
        hidden_states, attentions, cross_attentions: with ``output_hidden_states`` / ``output_attentions``
            (see :class:`~perceivers.io.PerceiverIOOutput`).
    """

    logits: dict[str, Tensor]
    last_hidden_state: Tensor
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


class MultimodalAutoencoder(SavesPretrained, nn.Module):
    """Encode video + audio (+ masked label) into latents; decode any subset of output points.

    Inputs (transformers' layout): ``image [B, T, C, H, W]`` in [0, 1], ``audio [B, N]`` or ``[B, N, 1]``
    in [−1, 1], optional ``label [B, num_labels]`` (zeros when omitted; it is masked anyway).
    """

    def __init__(self, config: MultimodalAutoencodingConfig) -> None:
        super().__init__()
        self.config = c = config
        t, h, w = c.patch_grid
        audio = AudioPreprocessor(
            c.samples_per_patch,
            position_encoding=build_position_encoding(
                "fourier", num_dims=1, num_bands=c.audio_num_bands, max_resolution=(c.num_audio_samples,)),
        )
        image = ImagePreprocessor(
            "patches", in_channels=c.in_channels, spatial_downsample=c.image_patch_size, temporal_downsample=1,
            position_encoding=build_position_encoding(
                "fourier", num_dims=3, num_bands=c.image_num_bands, max_resolution=(t, h, w)),
        )
        preprocessor = MultimodalPreprocessor(
            {"audio": audio, "image": image, "label": OneHotPreprocessor(c.num_labels)},
            mask_probs=c.mask_probs, min_padding_size=c.min_padding_size,
        )
        sizes = c.output_sizes
        queries = {
            "audio": FourierQueries((sizes["audio"],), c.audio_num_bands, (c.num_audio_samples,)),
            "image": FourierQueries((c.num_frames, *c.image_size), c.image_num_bands, (t, h, w)),
            "label": TrainableQueries(1, c.label_query_channels),
        }
        decoder = MultimodalDecoder(
            queries, latent_channels=c.d_latents, output_channels=c.output_num_channels,
            min_padding_size=c.decoder_min_padding_size, num_heads=c.num_decoder_heads,
            use_query_residual=c.decoder_query_residual, activation=c.hidden_act,
            cross_attention_shape_for_attn=c.cross_attention_shape_for_attention, dropout=c.dropout,
        )
        check_d_model(c.d_model, preprocessor.num_channels)
        postprocessor = MultimodalPostprocessor({
            "audio": AudioPostprocessor(c.output_num_channels, c.samples_per_patch),
            "image": ProjectionPostprocessor(c.output_num_channels, c.in_channels),
            "label": ClassificationPostprocessor(c.output_num_channels, c.num_labels),
        })
        self.perceiver = PerceiverIOModel(build_encoder(c, preprocessor.num_channels), decoder,
                                          input_preprocessor=preprocessor, output_postprocessor=postprocessor)
        set_attention_dropout(self, c.attention_probs_dropout_prob)

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        subsampled_output_points: Mapping[str, Tensor | None] | None = None,
        *,
        attention_mask: Tensor | None = None,
        labels: None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        head_mask: None = None,
    ) -> MultimodalAutoencodingOutput | tuple:
        """Args:
            inputs: ``{"image", "audio"[, "label"]}`` as in the class docstring.
            subsampled_output_points: ``{"image": flat indices into (T, H, W), "audio": indices of audio
                patches}``; a missing or ``None`` entry decodes all points of that modality. Query
                positions are ``-1 + 2·idx/N`` (the official chunked decoding), also for full decoding.
            attention_mask: ``[B, M]`` over all ``M`` input tokens (audio, image, label in sorted
                order), 1/True = attend.
            labels: refused with ``NotImplementedError``, as transformers does.
            output_hidden_states, output_attentions, return_dict, head_mask: as the image classifier's.
        """
        if labels is not None:
            raise NotImplementedError("multimodal autoencoding has no built-in loss (transformers: 'not yet "
                                      "supported'); compare .logits with your targets")
        check_unsupported(head_mask)
        c = self.config
        inputs = self._prepared(inputs)
        points = self._points(subsampled_output_points, inputs["image"].device)
        hidden, attentions, as_dict = output_flags(c, output_hidden_states, output_attentions, return_dict)
        out = self.perceiver(inputs, input_mask=attention_mask, subsampled_output_points=points,
                             output_hidden_states=hidden, output_attentions=attentions)
        if not as_dict:
            return transformers_tuple(None, out.logits, out)
        return MultimodalAutoencodingOutput(out.logits, out.last_hidden_state, None, out.hidden_states, out.attentions,
                                            out.cross_attentions)

    def _prepared(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The checked inputs, with a zero label where none is given."""
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a dict with 'image', 'audio' (and optionally 'label') tensors, got "
                            f"{type(inputs).__name__}")
        inputs = dict(inputs)
        unknown = set(inputs) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; expected {list(MODALITIES)}")
        self._check_inputs(inputs)
        if inputs.get("label") is None:
            ref = inputs["image"]
            inputs["label"] = torch.zeros(ref.shape[0], self.config.num_labels, device=ref.device, dtype=ref.dtype)
        return inputs

    def _points(self, points: Mapping[str, Tensor | None] | None, device: torch.device) -> dict[str, Tensor | None]:
        """Every modality's output points: the given ones, all of a modality given none, the label's one."""
        points = dict(points or {})
        for m in ("audio", "image"):
            if points.get(m) is None:
                points[m] = torch.arange(self.config.output_sizes[m], device=device)
        points["label"] = None
        return points

    def _check_inputs(self, inputs: Mapping[str, Tensor]) -> None:
        """Shapes fixed by the config: the Fourier queries and the output layout are built for them."""
        c = self.config
        missing = [m for m in ("audio", "image") if inputs.get(m) is None]
        if missing:
            raise ValueError(f"inputs lack {missing}: the model needs 'image' [batch, {c.num_frames}, "
                             f"{c.in_channels}, {c.image_size[0]}, {c.image_size[1]}] and 'audio' "
                             f"[batch, {c.num_audio_samples}]")
        want = (c.num_frames, c.in_channels, *c.image_size)
        image = check_tensor(inputs["image"], "inputs['image']", kind="float", ndim=5,
                             layout=f"[batch, {', '.join(map(str, want))}]")
        if tuple(image.shape[1:]) != want:
            raise ValueError(f"inputs['image'] must be [batch, {', '.join(map(str, want))}] (frames, channels, H, W), "
                             f"got {tuple(image.shape)}")
        audio = check_tensor(inputs["audio"], "inputs['audio']", kind="float", ndim=(2, 3),
                             layout=f"[batch, {c.num_audio_samples}] or [batch, {c.num_audio_samples}, 1]")
        if audio.shape[1] != c.num_audio_samples or (audio.ndim == 3 and audio.shape[2] != 1):
            raise ValueError(f"inputs['audio'] must be [batch, {c.num_audio_samples}] (or with a trailing 1), "
                             f"got {tuple(audio.shape)}")
        sizes = {m: inputs[m].shape[0] for m in MODALITIES if isinstance(inputs.get(m), Tensor)}
        if any(b != sizes["image"] for b in sizes.values()):  # pairwise: symbolic sizes are unhashable
            raise ValueError(f"all modalities must share the batch size, got {sizes}")
        label = inputs.get("label")
        if label is not None:
            check_tensor(label, "inputs['label']", kind="float", ndim=2, layout=f"[batch, {c.num_labels}]")
            if label.shape[1] != c.num_labels:
                raise ValueError(f"inputs['label'] must be [batch, {c.num_labels}], got {tuple(label.shape)}")

    def subsampling_chunks(self, num_chunks: int, device: torch.device | None = None) -> Iterator[dict[str, Tensor]]:
        """The official colab's chunking: chunk ``i`` decodes image points ``[i·n_i/K, (i+1)·n_i/K)`` and the
        matching audio patches (``K = num_chunks`` must divide both counts)."""
        sizes = self.config.output_sizes
        for m in ("audio", "image"):
            if sizes[m] % num_chunks:
                raise ValueError(f"{num_chunks} chunks do not divide the {sizes[m]} {m} outputs")
        for i in range(num_chunks):
            yield {m: torch.arange(i * sizes[m] // num_chunks, (i + 1) * sizes[m] // num_chunks, device=device)
                   for m in ("audio", "image")}

    @torch.no_grad()
    def reconstruct(self, inputs: Mapping[str, Tensor], num_chunks: int = 128) -> dict[str, Tensor]:
        """Decode everything chunk by chunk → ``{"image": [B, T, H, W, C], "audio": [B, N], "label": [B, classes]}``."""
        return self.decode_in_chunks(inputs, num_chunks)

    def decode_in_chunks(self, inputs: Mapping[str, Tensor], num_chunks: int = 128) -> dict[str, Tensor]:
        """:meth:`reconstruct` without switching gradients off: the chunks of :meth:`subsampling_chunks`
        decoded one after another, outputs concatenated; the label is the last chunk's (every chunk's is the
        same: decoder queries do not interact). The inputs are encoded once (the official colab runs the
        whole model per chunk, encoder included), with the same outputs."""
        c = self.config
        inputs = self._prepared(inputs)
        device = inputs["image"].device
        images, audios, label = [], [], None
        chunks = (self._points(points, device) for points in self.subsampling_chunks(num_chunks, device=device))
        for out in self.perceiver.decode_chunks(inputs, chunks):
            images.append(out["image"])
            audios.append(out["audio"])
            label = out["label"]
        image = torch.cat(images, dim=1).reshape(-1, c.num_frames, *c.image_size, c.in_channels)
        return {"image": image, "audio": torch.cat(audios, dim=1), "label": label}


@register_model(
    pretrained=PretrainedCfg(
        task="multimodal-autoencoding", haiku_checkpoint="video_autoencoding_checkpoint.pystate",
        hf_hub_id="deepmind/multimodal-perceiver", input_size=(16, 3, 224, 224), num_classes=700,
        label_set="kinetics-700-2020", num_params=19_858_855,
        metrics={"audio_psnr": 26.97, "video_psnr": 24.37, "top1_label_masked": 10.2},
        notes=("Frames in [0, 1] (no mean/std), audio 48 kHz in [-1, 1], 30720 samples; decoded in 128 chunks "
               "(arXiv 2107.14795 v3 Tab. 4, 784 latents / 88x)."),
    ),
    tiny={"num_frames": 2, "image_size": (8, 8), "audio_samples_per_frame": 16, "samples_per_patch": 8, "num_labels": 5,
              "image_num_bands": 2, "audio_num_bands": 3, "num_latents": 6, "d_latents": 16, "num_self_attends_per_block": 2,
              "num_self_attention_heads": 2, "label_query_channels": 12, "output_num_channels": 10},
)
def multimodal_perceiver(**overrides: Any) -> MultimodalAutoencoder:
    """784 × 512 latents, 8 self-attention layers; 52,097 input tokens of 704 channels."""
    return MultimodalAutoencoder(config_from_overrides(MultimodalAutoencodingConfig, {}, overrides))
