"""transformers' ``PerceiverConfig`` as our own dataclass: the same fields and defaults, no transformers import.

Used by :mod:`perceivers.hf_model` (``PerceiverModel`` and its blocks) and, for the defaults of fields a
``config.json`` leaves out, by :mod:`perceivers.convert.transformers`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .validation import check_config_types

__all__ = ["PerceiverConfig", "check_field_types", "model_defaults"]

#: keys of a transformers config dict that describe the file, not the model (read and dropped)
_FILE_KEYS = frozenset({
    "architectures", "transformers_version", "_name_or_path", "model_type", "dtype", "torch_dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "_attn_implementation_autoset", "_commit_hash",
})


@dataclass
class PerceiverConfig:
    """transformers' ``PerceiverConfig``: the same fields and defaults, no transformers import.

    The trunk fields (``num_latents`` … ``use_query_residual``) size the encoder; ``d_model`` is the input
    width without a preprocessor; the others are read by the building blocks (``vocab_size``,
    ``max_position_embeddings`` by the text blocks, ``num_labels`` by the classification blocks,
    ``samples_per_patch`` by the audio postprocessor, …). ``hidden_act`` is used with
    ``numerics="transformers"`` only; ``attention_probs_dropout_prob`` is dropout on the attention
    probabilities in training (transformers' default 0.1). ``initializer_range`` and ``layer_norm_eps`` are
    kept for round trips (transformers' Perceiver does not use ``layer_norm_eps`` either: its LayerNorms
    use 1e-5, as ours). ``num_labels`` and ``id2label`` / ``label2id`` follow each other as in transformers
    (``LABEL_i`` names by default). Keys of a dict that are none of these are kept in ``extra`` and written
    back by :meth:`to_dict`. A field of the wrong type (e.g. a size given as the string ``"256"``) is a
    ``TypeError`` (:func:`check_field_types`).
    """

    model_type: ClassVar[str] = "perceiver"

    num_latents: int = 256
    d_latents: int = 1280
    d_model: int = 768
    num_blocks: int = 1
    num_self_attends_per_block: int = 26
    num_self_attention_heads: int = 8
    num_cross_attention_heads: int = 8
    qk_channels: int | None = None
    v_channels: int | None = None
    cross_attention_shape_for_attention: str = "kv"
    self_attention_widening_factor: int = 1
    cross_attention_widening_factor: int = 1
    hidden_act: str = "gelu"
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    use_query_residual: bool = True
    vocab_size: int = 262
    max_position_embeddings: int = 2048
    image_size: int = 56
    train_size: tuple[int, int] = (368, 496)
    num_frames: int = 16
    audio_samples_per_frame: int = 1920
    samples_per_patch: int = 16
    output_shape: tuple[int, int, int, int] = (1, 16, 224, 224)
    output_num_channels: int = 512
    _label_trainable_num_channels: int = 1024
    num_labels: int | None = None
    id2label: dict | None = None
    label2id: dict | None = None
    problem_type: str | None = None
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_field_types(vars(self))
        if self.cross_attention_shape_for_attention not in ("kv", "q"):
            raise ValueError("cross_attention_shape_for_attention must be 'kv' or 'q', got "
                             f"{self.cross_attention_shape_for_attention!r}")
        if self.id2label:
            id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.num_labels is not None and self.num_labels != len(id2label):
                raise ValueError(f"num_labels={self.num_labels} but id2label names {len(id2label)} classes")
            self.id2label, self.num_labels = id2label, len(id2label)
        else:
            self.num_labels = 2 if self.num_labels is None else int(self.num_labels)
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.label2id = {name: i for i, name in self.id2label.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PerceiverConfig:
        """From a transformers ``config.to_dict()`` / ``config.json`` dict (file keys dropped, unknown kept)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names and k not in _FILE_KEYS and k != "extra"}
        if known.get("id2label") and "num_labels" not in values:
            known.pop("num_labels", None)
        return cls(**known, extra={**dict(values.get("extra") or {}), **extra})

    @classmethod
    def coerce(cls, config: Any) -> PerceiverConfig:
        """Ours as is; a transformers ``PerceiverConfig`` (anything with ``to_dict``) or a dict converted."""
        if isinstance(config, cls):
            return config
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a PerceiverConfig (ours or transformers') or a dict, got "
                            f"{type(config).__name__}")
        return cls.from_dict(config)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, revision: str | None = None,
                        cache_dir: str | os.PathLike[str] | None = None, local_files_only: bool | None = None,
                        token: str | bool | None = None, **overrides: Any) -> PerceiverConfig:
        """The ``config.json`` of a transformers Perceiver checkpoint (a directory, the file, or a Hub repo id),
        with ``overrides`` of its fields (as transformers: ``num_labels=`` alone renames the labels ``LABEL_i``)."""
        from .hub import resolve
        from .safe_files import read_json

        path = resolve(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                       token=token)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: not a transformers checkpoint directory")
        values = read_json(path)
        if not isinstance(values, Mapping) or values.get("model_type") != "perceiver":
            found = values.get("model_type") if isinstance(values, Mapping) else type(values).__name__
            raise ValueError(f"{path} is not a transformers Perceiver config (model_type 'perceiver'), got {found!r}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown PerceiverConfig fields {unknown}")
        if "num_labels" in overrides and "id2label" not in overrides:
            values = {k: v for k, v in values.items() if k not in ("id2label", "label2id")}
        return cls.from_dict({**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """transformers' ``config.to_dict()`` fields (``model_type`` included), ``extra`` merged in."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {"model_type": self.model_type, **out, **self.extra}


def check_field_types(values: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` naming the first field of :class:`PerceiverConfig` in ``values`` (a ``config.json``
    dict, …) whose value is not of the field's type, with the value that came; other keys are not looked at."""
    check_config_types(values, PerceiverConfig)


def model_defaults() -> dict[str, Any]:
    """transformers' defaults of the fields that size a model (labels, output flags and ``extra`` left out)."""
    skip = {"num_labels", "id2label", "label2id", "problem_type", "output_attentions", "output_hidden_states",
            "return_dict", "extra"}
    return {f.name: f.default for f in dataclasses.fields(PerceiverConfig) if f.name not in skip}
