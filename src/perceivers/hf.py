"""transformers' Perceiver class names, for code written against ``transformers``.

Change ``from transformers import PerceiverForMaskedLM`` to ``from perceivers.hf import
PerceiverForMaskedLM`` and the usual calls run on our task models::

    model = PerceiverForImageClassificationConvProcessing.from_pretrained("deepmind/vision-perceiver-conv")
    out = model(inputs=pixel_values, labels=labels, output_hidden_states=True, output_attentions=True)

Each name stands for one registered variant (:data:`VARIANTS`); it builds nothing of its own. Its
:meth:`~TransformersName.from_pretrained` loads through :func:`perceivers.from_pretrained` (transformers
checkpoints — directories or Hub ids — and our own format) and refuses a checkpoint of another
architecture; calling the name builds a randomly initialised model (from a transformers
``PerceiverConfig`` if given). The models are our task classes
(:class:`~perceivers.tasks.ImageClassifier`, …), so ``isinstance`` holds for both names, and
``model.save_pretrained(dir)`` writes our format, which ``from_pretrained`` reads back.

Computation follows DeepMind's official model unless ``numerics="transformers"`` is passed (then
outputs equal transformers' within float rounding). See docs/transformers-api.md for the differences.

:class:`PerceiverTokenizer` and :class:`PerceiverImageProcessor` (with :class:`AutoTokenizer` and
:class:`AutoImageProcessor`, which return them) complete transformers' usage examples: their results
index like transformers' ``BatchEncoding`` / ``BatchFeature`` (``.input_ids``, ``.pixel_values``).

transformers' generic API — :class:`PerceiverConfig`, :class:`PerceiverModel` and the building blocks
(``PerceiverImagePreprocessor``, ``PerceiverClassificationDecoder``, …) with transformers' constructor
arguments — comes from :mod:`perceivers.hf_model`, re-exported here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from .convert.transformers import ARCHITECTURES
from .data.image import IMAGENET_MEAN, IMAGENET_STD, ImageNetEvalTransform, load_image
from .data.tokenizer import SPECIAL_TOKENS, ByteTokenizer
from .hf_model import (
    PerceiverAudioPostprocessor,
    PerceiverAudioPreprocessor,
    PerceiverBasicDecoder,
    PerceiverBasicVideoAutoencodingDecoder,
    PerceiverClassificationDecoder,
    PerceiverClassificationPostprocessor,
    PerceiverConfig,
    PerceiverEmbeddingDecoder,
    PerceiverImagePreprocessor,
    PerceiverModel,
    PerceiverModelOutput,
    PerceiverMultimodalDecoder,
    PerceiverMultimodalPostprocessor,
    PerceiverMultimodalPreprocessor,
    PerceiverOneHotPreprocessor,
    PerceiverOpticalFlowDecoder,
    PerceiverProjectionDecoder,
    PerceiverProjectionPostprocessor,
    PerceiverTextPreprocessor,
)
from .safe_files import read_json

__all__ = [
    "VARIANTS",
    "AutoImageProcessor",
    "AutoTokenizer",
    "BatchFeature",
    "PerceiverAudioPostprocessor",
    "PerceiverAudioPreprocessor",
    "PerceiverBasicDecoder",
    "PerceiverBasicVideoAutoencodingDecoder",
    "PerceiverClassificationDecoder",
    "PerceiverClassificationPostprocessor",
    "PerceiverConfig",
    "PerceiverEmbeddingDecoder",
    "PerceiverForImageClassificationConvProcessing",
    "PerceiverForImageClassificationFourier",
    "PerceiverForImageClassificationLearned",
    "PerceiverForMaskedLM",
    "PerceiverForMultimodalAutoencoding",
    "PerceiverForOpticalFlow",
    "PerceiverForSequenceClassification",
    "PerceiverImagePreprocessor",
    "PerceiverImageProcessor",
    "PerceiverModel",
    "PerceiverModelOutput",
    "PerceiverMultimodalDecoder",
    "PerceiverMultimodalPostprocessor",
    "PerceiverMultimodalPreprocessor",
    "PerceiverOneHotPreprocessor",
    "PerceiverOpticalFlowDecoder",
    "PerceiverProjectionDecoder",
    "PerceiverProjectionPostprocessor",
    "PerceiverTextPreprocessor",
    "PerceiverTokenizer",
    "TransformersName",
]

logger = logging.getLogger(__name__)

#: transformers head class → our registered variant (the checkpoint converter's table).
VARIANTS: dict[str, str] = ARCHITECTURES
_NAME_OF = {v: k for k, v in VARIANTS.items()}


class _NameMeta(type):
    """``isinstance(model, Name)`` asks whether ``model`` is the variant ``Name`` stands for."""

    def __instancecheck__(cls, obj: object) -> bool:
        variant = cls.__dict__.get("variant")
        return variant is not None and getattr(obj, "model_name", None) == variant

    def __call__(cls, config: Any = None, *, numerics: str = "deepmind", **overrides: Any) -> nn.Module:
        return cls.from_config(config, numerics=numerics, **overrides)


class TransformersName(metaclass=_NameMeta):
    """Base of the transformers names; ``variant`` is the registered model the name stands for."""

    variant: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.variant = VARIANTS[cls.__name__]

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str], **kwargs: Any) -> nn.Module:
        """Load a checkpoint of this architecture with :func:`perceivers.from_pretrained` (eval mode).

        Args:
            path_or_id: a directory or Hub id, in transformers' format or ours.
            **kwargs: options of :func:`perceivers.from_pretrained` (``revision``, ``map_location``, …) and,
                for transformers checkpoints, of ``from_transformers`` (``numerics="transformers"`` to
                reproduce transformers' outputs).

        Raises:
            ValueError: the checkpoint holds another architecture.
        """
        from .hub import from_pretrained

        model = from_pretrained(path_or_id, **kwargs)
        cls._check_variant(model, path_or_id)
        return model

    @classmethod
    def from_config(cls, config: Any = None, *, numerics: str = "deepmind", **overrides: Any) -> nn.Module:
        """A randomly initialised model: official sizes, or those of a transformers ``PerceiverConfig``
        (or its dict), with ``overrides`` (our config field names) on top. ``Name(config)`` calls this."""
        from .convert.transformers import overrides_from_config, use_transformers_numerics
        from .tasks import create_model

        if numerics not in ("deepmind", "transformers"):
            raise ValueError(f"numerics must be 'deepmind' or 'transformers', got {numerics!r}")
        if config is None:
            if numerics == "transformers":
                raise ValueError("numerics='transformers' needs a transformers PerceiverConfig (its hidden_act)")
            return create_model(cls.variant, **overrides)
        cfg = config.to_dict() if hasattr(config, "to_dict") else config
        if not isinstance(cfg, Mapping):
            raise TypeError(f"config must be a transformers PerceiverConfig or a dict, got {type(config).__name__}")
        _, sizes = overrides_from_config(cfg, cls.__name__, numerics)
        if "num_labels" in overrides and "labels" not in overrides:
            sizes.pop("labels", None)  # the config's class names belong to its own num_labels
        model = create_model(cls.variant, **{**sizes, **overrides})
        if numerics == "transformers":
            use_transformers_numerics(model, cfg.get("hidden_act", "gelu"))
        return model

    @classmethod
    def _check_variant(cls, model: nn.Module, source: object) -> None:
        got = getattr(model, "model_name", None)
        if got != cls.variant:
            what = f"{_NAME_OF[got]} ({got})" if got in _NAME_OF else (got or type(model).__name__)
            raise ValueError(f"{source} holds a {what}, not a {cls.__name__} ({cls.variant}); load it with "
                             f"perceivers.from_pretrained or the matching perceivers.hf name")


class PerceiverForImageClassificationLearned(TransformersName):
    """ImageNet classifier with learned positions → :class:`~perceivers.tasks.ImageClassifier`."""


class PerceiverForImageClassificationFourier(TransformersName):
    """ImageNet classifier on pixels + Fourier features → :class:`~perceivers.tasks.ImageClassifier`."""


class PerceiverForImageClassificationConvProcessing(TransformersName):
    """ImageNet classifier with a conv stem → :class:`~perceivers.tasks.ImageClassifier`."""


class PerceiverForMaskedLM(TransformersName):
    """Byte-level masked language model → :class:`~perceivers.tasks.MaskedLanguageModel`."""


class PerceiverForOpticalFlow(TransformersName):
    """Optical flow → :class:`~perceivers.tasks.OpticalFlowModel` (``.logits`` as transformers, ``.flow`` in pixels)."""


class PerceiverForMultimodalAutoencoding(TransformersName):
    """Video + audio + label autoencoder → :class:`~perceivers.tasks.MultimodalAutoencoder`."""


class PerceiverForSequenceClassification(TransformersName):
    """Byte-level sequence classifier → :class:`~perceivers.tasks.SequenceClassifier`."""

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str], *, num_labels: int | None = None,
                        **kwargs: Any) -> nn.Module:
        """As :meth:`TransformersName.from_pretrained`; a masked-LM checkpoint (e.g.
        ``deepmind/language-perceiver``) gives a classifier with its trunk and a new decoder, as transformers
        does (:func:`perceivers.tasks.from_language_model`; ``num_labels`` default 2)."""
        from .hub import from_pretrained
        from .tasks import from_language_model

        model = from_pretrained(path_or_id, **kwargs)
        if getattr(model, "model_name", None) == "language-perceiver":
            logger.warning("%s is a masked language model: its trunk starts a new %s whose classification decoder "
                           "is randomly initialised; fine-tune it", path_or_id, cls.__name__)
            return from_language_model(model, num_labels=2 if num_labels is None else num_labels)
        cls._check_variant(model, path_or_id)
        if num_labels is not None and num_labels != model.config.num_labels:
            raise ValueError(f"{path_or_id} has num_labels={model.config.num_labels}, not {num_labels}")
        return model


class BatchFeature(dict):
    """The tokenizer's and image processor's result: a dict whose keys also read as attributes
    (``batch.input_ids``, ``batch.pixel_values``), like transformers' ``BatchEncoding`` / ``BatchFeature``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no {name!r}; keys: {sorted(self)}") from None


def _local_json(path_or_id: str | os.PathLike[str] | None, name: str) -> dict[str, Any] | None:
    """``name`` in a local directory, parsed; ``None`` for Hub ids and directories without it (nothing is
    downloaded)."""
    if path_or_id is None or not Path(path_or_id).is_dir() or not (Path(path_or_id) / name).is_file():
        return None
    return read_json(Path(path_or_id) / name)


class PerceiverTokenizer(ByteTokenizer):
    """:class:`~perceivers.data.ByteTokenizer` with transformers' defaults and return types.

    ``[CLS] text [SEP]`` (and ``[CLS] a [SEP] b [SEP]`` for pairs), the literal strings ``[MASK]``,
    ``[CLS]``, … read as their special ids, no padding or truncation unless asked, Python lists unless
    ``return_tensors="pt"``, and :meth:`decode` that writes special tokens out unless
    ``skip_special_tokens=True``. The ids are those of transformers' ``PerceiverTokenizer``; the results
    are :class:`BatchFeature` dicts (``.input_ids``). ``vocab_size`` is 262 (transformers' attribute says
    256, its ``len()`` 262).
    """

    pad_token_id, bos_token_id, eos_token_id = SPECIAL_TOKENS["[PAD]"], SPECIAL_TOKENS["[BOS]"], SPECIAL_TOKENS["[EOS]"]
    mask_token_id, cls_token_id, sep_token_id = SPECIAL_TOKENS["[MASK]"], SPECIAL_TOKENS["[CLS]"], SPECIAL_TOKENS["[SEP]"]
    pad_token, bos_token, eos_token, mask_token, cls_token, sep_token = (
        "[PAD]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]")
    padding_side = "right"
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def __init__(self, model_max_length: int = 2048) -> None:
        super().__init__(model_max_length, add_special_tokens=True, parse_special_tokens=True)

    @property
    def model_max_length(self) -> int:
        return self.max_length

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str] | None = None, **kwargs: Any) -> PerceiverTokenizer:
        """The bytes are the vocabulary, so only ``model_max_length`` is read: from ``kwargs``, else from
        ``tokenizer_config.json`` when ``path_or_id`` is a local directory (transformers' ``save_pretrained``),
        else 2048 (``deepmind/language-perceiver``'s). Hub ids are not resolved; nothing is downloaded."""
        saved = _local_json(path_or_id, "tokenizer_config.json") or {}
        kind = saved.get("tokenizer_class")
        if kind not in (None, "PerceiverTokenizer"):
            raise ValueError(f"{path_or_id} holds a {kind}, not a PerceiverTokenizer")
        return cls(int(kwargs.get("model_max_length", saved.get("model_max_length", 2048))))

    def __call__(  # type: ignore[override]
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
    ) -> BatchFeature:
        """transformers' call: ``{"input_ids", "attention_mask"}``; lists (flat for one string) unless
        ``return_tensors="pt"`` (``[B, n]`` int64 tensors). ``padding``: ``False``/``"do_not_pad"``,
        ``True``/``"longest"``, ``"max_length"`` (to ``max_length``, default ``model_max_length``)."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        mode = {False: "do_not_pad", True: "longest"}.get(padding, padding)
        if mode not in ("do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding must be True/False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        texts = [text] if isinstance(text, str) else list(text)
        pairs = [None] * len(texts) if text_pair is None else [text_pair] if isinstance(text_pair, str) else list(text_pair)
        if len(pairs) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(pairs)} pairs")
        limit = (max_length or self.max_length) if truncation else None
        seqs = [self._encode_fitted(t, p, add_special_tokens, limit) for t, p in zip(texts, pairs)]
        width = {"longest": max(map(len, seqs), default=0), "max_length": max_length or self.max_length}.get(mode, 0)
        ids = [s + [self.pad_id] * (width - len(s)) for s in seqs]
        mask = [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
        if return_tensors == "pt":
            if len({len(row) for row in ids}) > 1:
                raise ValueError("sequences of different lengths need padding=True to become one tensor")
            return BatchFeature(input_ids=torch.tensor(ids, dtype=torch.long),
                                attention_mask=torch.tensor(mask, dtype=torch.long))
        out = BatchFeature(input_ids=ids, attention_mask=mask)
        if return_tensors is None and isinstance(text, str):
            out = BatchFeature({k: v[0] for k, v in out.items()})
        return out

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = False) -> str:  # type: ignore[override]
        """Ids → text; special ids become ``[CLS]``, ``[PAD]``, … unless ``skip_special_tokens``."""
        if skip_special_tokens:
            return super().decode(ids)
        if isinstance(ids, Tensor):
            super().decode(ids)  # validates dtype and rank
            ids = ids.tolist()
        names = {v: k for k, v in SPECIAL_TOKENS.items()}
        parts: list[str] = []
        run: list[int] = []
        for i in list(ids) + [None]:
            if i is None or (not isinstance(i, bool) and hasattr(i, "__index__") and int(i) in names):
                parts.append(super().decode(run))
                run = []
                if i is not None:
                    parts.append(names[int(i)])
            else:
                run.append(i)
        return "".join(parts)

    def batch_decode(self, ids: Sequence[Sequence[int]] | Tensor,  # type: ignore[override]
                     skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]


class AutoTokenizer:
    """transformers' ``AutoTokenizer`` for the Perceiver: :meth:`from_pretrained` gives a :class:`PerceiverTokenizer`."""

    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike[str], **kwargs: Any) -> PerceiverTokenizer:
        return PerceiverTokenizer.from_pretrained(path_or_id, **kwargs)


def _side(value: Any, name: str) -> int:
    """transformers' ``{"height": h, "width": w}`` (or an int) → one side; non-square sizes are refused."""
    if isinstance(value, Mapping):
        if set(value) != {"height", "width"}:
            raise ValueError(f"{name} must be {{'height': h, 'width': w}}, got {dict(value)}")
        if value["height"] != value["width"]:
            raise NotImplementedError(f"only square {name} is supported, got {dict(value)}")
        value = value["height"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or {{'height': h, 'width': w}}, got {value!r}")
    return value


class PerceiverImageProcessor:
    """transformers' ``PerceiverImageProcessor``: the ImageNet evaluation preprocessing, transformers' way.

    A centre crop of ``size/crop_size`` of the shorter side (224/256; offsets rounded down), PIL bicubic
    resize to ``size``, ``/255`` and the ImageNet mean/std: :class:`~perceivers.data.ImageNetEvalTransform`
    with ``resample="pil"`` and ``crop_rounding="transformers"``. Equals transformers' processor within
    1e-5 (its PIL backend; the torchvision backend it prefers when torchvision is installed resizes with
    torchvision's bicubic and differs slightly from both).

    Args:
        size, crop_size: ``{"height": s, "width": s}`` or an int (square only).
        image_mean, image_std: per-channel statistics on the 0..1 scale.
        do_normalize: ``False`` gives the resized pixels ``/255``.
        do_center_crop, do_resize, do_rescale, rescale_factor, resample: only transformers' defaults
            (``True``, ``True``, ``True``, ``1/255``, bicubic ``3``) are supported.
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values"]
    _METADATA = ("image_processor_type", "processor_class", "feature_extractor_type")

    def __init__(self, *, size: Any = 224, crop_size: Any = 256, image_mean: Sequence[float] = IMAGENET_MEAN,
                 image_std: Sequence[float] = IMAGENET_STD, do_normalize: bool = True, do_center_crop: bool = True,
                 do_resize: bool = True, do_rescale: bool = True, rescale_factor: float = 1 / 255,
                 resample: int = 3) -> None:
        unsupported = {k: v for k, v, ok in [
            ("do_center_crop", do_center_crop, do_center_crop is True), ("do_resize", do_resize, do_resize is True),
            ("do_rescale", do_rescale, do_rescale is True), ("rescale_factor", rescale_factor, abs(rescale_factor * 255 - 1) < 1e-9),
            ("resample", resample, resample == 3)] if not ok}
        if unsupported:
            raise NotImplementedError(f"PerceiverImageProcessor supports transformers' defaults only; got {unsupported}")
        self.size, self.crop_size = _side(size, "size"), _side(crop_size, "crop_size")
        if self.crop_size <= self.size:
            raise ValueError(f"crop_size ({self.crop_size}) must exceed size ({self.size}): the crop keeps size/crop_size")
        self.image_mean, self.image_std = tuple(float(m) for m in image_mean), tuple(float(s) for s in image_std)
        self.do_normalize = bool(do_normalize)
        mean, std = (self.image_mean, self.image_std) if self.do_normalize else ((0.0,) * 3, (1.0,) * 3)
        self.transform = ImageNetEvalTransform(size=self.size, crop_padding=self.crop_size - self.size, resample="pil",
                                               mean=mean, std=std, crop_rounding="transformers")

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str] | None = None, **kwargs: Any) -> PerceiverImageProcessor:
        """Options from ``preprocessor_config.json`` when ``path_or_id`` is a local directory (transformers'
        ``save_pretrained``), with ``kwargs`` on top; transformers' defaults otherwise (Hub ids are not
        resolved; nothing is downloaded)."""
        saved = {k: v for k, v in (_local_json(path_or_id, "preprocessor_config.json") or {}).items()
                 if k not in cls._METADATA and not k.startswith("_")}
        return cls(**{**saved, **kwargs})

    def __call__(self, images: Any, return_tensors: str | None = None) -> BatchFeature:
        """One image or a list (PIL images, ``uint8`` arrays/tensors ``[H, W, 3]`` or ``[3, H, W]``) →
        ``{"pixel_values"}``: a ``[B, 3, size, size]`` tensor with ``return_tensors="pt"`` (an array with
        ``"np"``), else a list of ``float32 [3, size, size]`` arrays."""
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        pixels = [self.transform(_channels_last(image)) for image in batch]
        if return_tensors == "pt":
            return BatchFeature(pixel_values=torch.stack(pixels))
        arrays = [p.numpy() for p in pixels]
        return BatchFeature(pixel_values=np.stack(arrays) if return_tensors == "np" else arrays)

    preprocess = __call__


def _channels_last(image: Any) -> Any:
    """``[C, H, W]`` arrays/tensors (C = 1 or 3, as transformers infers) → ``[H, W, C]``; others unchanged."""
    if isinstance(image, (np.ndarray, Tensor)) and image.ndim == 3 and image.shape[0] in (1, 3):
        image = image.permute(1, 2, 0) if isinstance(image, Tensor) else image.transpose(1, 2, 0)
        if image.shape[-1] == 1:
            image = image[..., 0]
    return load_image(image)


class AutoImageProcessor:
    """transformers' ``AutoImageProcessor`` for the Perceiver: :meth:`from_pretrained` gives a
    :class:`PerceiverImageProcessor`."""

    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike[str], **kwargs: Any) -> PerceiverImageProcessor:
        return PerceiverImageProcessor.from_pretrained(path_or_id, **kwargs)
