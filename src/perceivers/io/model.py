"""The composed Perceiver IO: input preprocessor → encoder → decoder → output postprocessor."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..configurable import configurable
from ..validation import as_bool_mask, check_finite, check_like, check_tensor
from .encoder import PerceiverEncoder

__all__ = ["PerceiverIOModel", "PerceiverIOOutput"]


@dataclass
class PerceiverIOOutput:
    """Output of :class:`PerceiverIOModel`.

    Attributes:
        logits: the decoder output after the postprocessor (a tensor, or a dict per modality).
        last_hidden_state: the latents after the encoder ``[B, N, D]``.
    """

    logits: Any
    last_hidden_state: Tensor


@configurable
class PerceiverIOModel(nn.Module):
    """DeepMind's ``Perceiver(encoder, decoder, input_preprocessor, output_postprocessor)``.

    Args:
        encoder: a :class:`~perceivers.io.PerceiverEncoder`.
        decoder: any decoder of :mod:`perceivers.io.decoders`.
        input_preprocessor: returns :class:`~perceivers.io.processors.Preprocessed`; without one the
            inputs must already be ``[B, M, C]``.
        output_postprocessor: applied to the decoder output; multimodal postprocessors receive
            ``modality_sizes``.
    """

    def __init__(
        self,
        encoder: PerceiverEncoder,
        decoder: nn.Module,
        *,
        input_preprocessor: nn.Module | None = None,
        output_postprocessor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if input_preprocessor is not None and input_preprocessor.num_channels != encoder.input_channels:
            raise ValueError(
                f"preprocessor gives {input_preprocessor.num_channels} channels but the encoder expects "
                f"{encoder.input_channels}"
            )
        self.input_preprocessor = input_preprocessor
        self.encoder = encoder
        self.decoder = decoder
        self.output_postprocessor = output_postprocessor
        self._post_takes_sizes = output_postprocessor is not None and (
            "modality_sizes" in inspect.signature(output_postprocessor.forward).parameters
        )

    def _check_inputs(self, inputs: Tensor | Mapping[str, Tensor]) -> None:
        """Every raw input is a non-empty, finite tensor on the model's device (floating ones in its dtype)."""
        if isinstance(inputs, Mapping):
            if not inputs:
                raise ValueError("inputs is an empty mapping; pass {modality: tensor}")
            items = [(f"inputs[{k!r}]", v) for k, v in inputs.items() if v is not None]
        else:
            items = [("inputs", inputs)]
        for name, value in items:
            check_tensor(value, name, kind=None)
            check_like(value, self, name)
            check_finite(value, name)

    def forward(
        self,
        inputs: Tensor | Mapping[str, Tensor],
        *,
        input_mask: Tensor | None = None,
        query_mask: Tensor | None = None,
        subsampled_output_points: Tensor | Mapping[str, Tensor | None] | None = None,
        query_kwargs: Mapping[str, Any] | None = None,
    ) -> PerceiverIOOutput:
        """Run the four stages.

        Args:
            inputs: raw inputs for the preprocessor (or ``[B, M, C]`` without one).
            input_mask: ``[B, M]`` bool, True = real input token (encoder key mask).
            query_mask: ``[B, Q]`` bool, True = real query (False rows decode from zero attention).
            subsampled_output_points: flat output indices to decode (a dict per modality for
                multimodal decoders).
            query_kwargs: extra arguments for the decoder's query builder (e.g. ``length``).
        """
        self._check_inputs(inputs)
        input_mask = as_bool_mask(input_mask, "input_mask")
        query_mask = as_bool_mask(query_mask, "query_mask")
        for name, m in (("input_mask", input_mask), ("query_mask", query_mask)):
            if m is not None:
                check_like(m, self, name)
        if self.input_preprocessor is not None:
            x, modality_sizes, without_pos = self.input_preprocessor(inputs)
        else:
            if inputs.ndim != 3:
                raise ValueError("without an input preprocessor, inputs must be a [batch, tokens, channels] tensor, "
                                 f"got shape {tuple(inputs.shape)}")
            x, modality_sizes, without_pos = inputs, None, None
        latents = self.encoder(x, mask=input_mask)
        query = self.decoder.decoder_query(
            x, modality_sizes=modality_sizes, inputs_without_pos=without_pos,
            subsampled_points=subsampled_output_points, **dict(query_kwargs or {}),
        )
        out = self.decoder(query, latents, query_mask=query_mask)
        if self.output_postprocessor is not None:
            if self._post_takes_sizes:
                sizes = self.decoder.output_modality_sizes(subsampled_output_points) or modality_sizes
                out = self.output_postprocessor(out, modality_sizes=sizes)
            else:
                out = self.output_postprocessor(out)
        return PerceiverIOOutput(logits=out, last_hidden_state=latents)
