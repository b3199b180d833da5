"""The composed Perceiver IO: input preprocessor → encoder → decoder → output postprocessor."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

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
        if self.input_preprocessor is not None:
            x, modality_sizes, without_pos = self.input_preprocessor(inputs)
        else:
            if not isinstance(inputs, Tensor) or inputs.ndim != 3:
                raise ValueError("without an input preprocessor, inputs must be a [batch, tokens, channels] tensor")
            x, modality_sizes, without_pos = inputs, None, None
        if input_mask is not None and input_mask.dtype != torch.bool:
            input_mask = input_mask != 0
        if query_mask is not None and query_mask.dtype != torch.bool:
            query_mask = query_mask != 0
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
