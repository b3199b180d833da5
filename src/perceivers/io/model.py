"""The composed Perceiver IO: input preprocessor → encoder → decoder → output postprocessor."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..configurable import configurable
from ..layers import SelfAttentionBlock, auto_chunk_size, check_chunk_size, grid_attention, loops
from ..layers.attention import record_attention
from ..layers.stream import DEFAULT_CHUNK
from ..outputs import model_output
from ..validation import as_bool_mask, check_finite, check_like, check_tensor
from .decoders import (
    BasicDecoder,
    ClassificationDecoder,
    FlowDecoder,
    MultimodalDecoder,
    ProjectionDecoder,
    VideoAutoencodingDecoder,
    couples_queries,
)
from .encoder import PerceiverEncoder
from .processors.multimodal import MultimodalPostprocessor
from .processors.postprocessors import rowwise_parts
from .queries import InputQueries

__all__ = ["PerceiverIOModel", "PerceiverIOOutput", "decoder_reads_inputs"]


@model_output
@dataclass
class PerceiverIOOutput:
    """Output of :class:`PerceiverIOModel`.

    Attributes:
        logits: the decoder output after the postprocessor (a tensor, or a dict per modality).
        last_hidden_state: the latents after the encoder ``[B, N, D]``.
        hidden_states: with ``output_hidden_states``: the latents before every encoder self-attention
            layer and after every block (see :meth:`PerceiverEncoder.forward`).
        attentions: with ``output_attentions``: the encoder self-attention weights ``[B, H, N, N]``,
            one per layer call.
        cross_attentions: with ``output_attentions``: the encoder cross-attention weights ``[B, H, N, M]``,
            then the decoder's ``[B, H, Q, N]``, one per decoder cross-attention layer (none for a
            decoder without attention).
        decoder_self_attentions: with ``output_attentions`` and a decoder with query self-attention
            (``num_self_attends_per_cross``): its weights ``[B, H, Q, Q]``, one per layer, else ``None``.
    """

    logits: Any
    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None
    decoder_self_attentions: tuple[Tensor, ...] | None = None


@configurable
class PerceiverIOModel(nn.Module):
    """DeepMind's ``Perceiver(encoder, decoder, input_preprocessor, output_postprocessor)``.

    Args:
        encoder: a :class:`~perceivers.io.PerceiverEncoder`.
        decoder: any decoder of :mod:`perceivers.io.decoders`; ``None`` for none (the output's ``logits``
            is then ``None``: the latents are the result).
        input_preprocessor: returns :class:`~perceivers.io.processors.Preprocessed`; without one the
            inputs must already be ``[B, M, C]``.
        output_postprocessor: applied to the decoder output; multimodal postprocessors receive
            ``modality_sizes``.
        chunk_size: stream large inputs through the encoder's cross-attention in chunks of about
            this many tokens, so that memory stays flat in the input size (exact up to float
            rounding). ``None`` (default): without autograd above 32768 tokens per sample (chunks of a
            quarter of the input, 32768–65536), with autograd above 65536 (chunks of 65536, each
            recomputed in the backward pass); ``0``: never. When the preprocessor can build its
            tokens chunk by chunk (images, optical-flow frames: ``streams``) and the decoder does not
            need them whole (:func:`decoder_reads_inputs`), the whole token array never exists;
            otherwise the tokens are built whole and only their keys, values and scores are
            streamed. A plain attribute, so it can be changed on a built model.
    """

    def __init__(
        self,
        encoder: PerceiverEncoder,
        decoder: nn.Module | None,
        *,
        input_preprocessor: nn.Module | None = None,
        output_postprocessor: nn.Module | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if input_preprocessor is not None and input_preprocessor.num_channels != encoder.input_channels:
            raise ValueError(
                f"preprocessor gives {input_preprocessor.num_channels} channels but the encoder expects "
                f"{encoder.input_channels}"
            )
        if decoder is None and output_postprocessor is not None:
            raise ValueError("an output_postprocessor needs a decoder (it postprocesses the decoder's output)")
        self.input_preprocessor = input_preprocessor
        self.encoder = encoder
        self.decoder = decoder
        self.output_postprocessor = output_postprocessor
        self._post_takes_sizes = output_postprocessor is not None and (
            "modality_sizes" in inspect.signature(output_postprocessor.forward).parameters
        )
        self._decoder_takes_points = decoder is not None and (  # its output layout depends on them
            "subsampled_points" in inspect.signature(decoder.forward).parameters
        )
        self._decoder_takes_head = isinstance(decoder, BasicDecoder) and (  # applies a row-wise step per chunk
            "head" in inspect.signature(decoder.forward).parameters)
        self.chunk_size = chunk_size

    @property
    def chunk_size(self) -> int | None:
        """See the class docstring; also sets the encoder cross-attention's ``chunk_size``."""
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        self._chunk_size = check_chunk_size(value)
        cross = getattr(self.encoder, "cross_attention", None)
        if cross is not None:
            cross.chunk_size = value

    def _stream_size(self, inputs: Tensor | Mapping[str, Tensor], *, masked: bool = False) -> int:
        """Chunk size to ask the preprocessor to stream ``inputs`` with, or 0 to build them whole.

        Images too small to stream that the native grid kernel would attend (see
        :func:`perceivers.layers.grid_attention.serves`) are streamed as one chunk.
        """
        pre = self.input_preprocessor
        streams = getattr(pre, "streams", None)
        if streams is None or not streams(inputs) or decoder_reads_inputs(self.decoder):
            return 0
        if isinstance(inputs, Mapping):  # a multimodal preprocessor: the modalities that stream decide
            length, raw = pre.stream_length(inputs), [v for v in inputs.values() if isinstance(v, Tensor)]
        else:
            length, raw = math.prod(pre.output_index_shape(tuple(inputs.shape))), [inputs]
        grad = torch.is_grad_enabled() and (any(v.requires_grad for v in raw)
                                            or any(p.requires_grad for p in self.parameters()))
        size = auto_chunk_size(length, self.chunk_size, grad=grad, channels=pre.num_channels, batch=raw[0].shape[0],
                               device=raw[0].device)
        cross = getattr(self.encoder, "cross_attention", None)
        dropout = self.training and cross is not None and cross.attn.dropout > 0
        if (not size and self.chunk_size is None and getattr(pre, "gives_grid", lambda x: False)(inputs)
                and grid_attention.serves(inputs, masked=masked, dropout=dropout, pixels=length)):
            return length
        if not size and loops(length, self.chunk_size, grad=grad):  # torch.export, symbolic size: a while_loop
            return self.chunk_size or DEFAULT_CHUNK
        return size

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
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> PerceiverIOOutput:
        """Run the four stages.

        Args:
            inputs: raw inputs for the preprocessor (or ``[B, M, C]`` without one).
            input_mask: ``[B, M]`` bool, True = real input token (encoder key mask).
            query_mask: ``[B, Q]`` bool, True = real query (False rows decode from zero attention).
            subsampled_output_points: flat output indices to decode (a dict per modality for
                multimodal decoders). Refused (``ValueError``) when the decoder has query
                self-attention (:func:`~perceivers.io.couples_queries`): every output depends on all
                queries, so a subset would not decode as it does within the whole set.
            query_kwargs: extra arguments for the decoder's query builder (e.g. ``length``).
            output_hidden_states: also return the encoder's intermediate latents.
            output_attentions: also return every attention's weights (computed explicitly through
                :func:`~perceivers.layers.attention.record_attention`: the inputs are built whole,
                not streamed, and the outputs may differ from the default path by float rounding).
        """
        if not output_attentions:
            return self._forward(inputs, input_mask, query_mask, subsampled_output_points, query_kwargs,
                                 output_hidden_states, stream=True)
        with record_attention(self) as records:
            out = self._forward(inputs, input_mask, query_mask, subsampled_output_points, query_kwargs,
                                output_hidden_states, stream=False)
        encoder_cross = self.encoder.cross_attention.attn
        in_stack = {id(m) for m in self.encoder.self_attends.modules()}
        in_decoder = set() if self.decoder is None else {id(m) for m in self.decoder.modules()}
        decoder_self = set() if self.decoder is None else {
            id(m.attn) for m in self.decoder.modules() if isinstance(m, SelfAttentionBlock)}
        out.attentions = tuple(w for m, w in records if id(m) in in_stack)
        out.cross_attentions = (tuple(w for m, w in records if m is encoder_cross)
                                + tuple(w for m, w in records if id(m) in in_decoder and id(m) not in decoder_self))
        if decoder_self:
            out.decoder_self_attentions = tuple(w for m, w in records if id(m) in decoder_self)
        return out

    def _forward(
        self,
        inputs: Tensor | Mapping[str, Tensor],
        input_mask: Tensor | None,
        query_mask: Tensor | None,
        subsampled_output_points: Tensor | Mapping[str, Tensor | None] | None,
        query_kwargs: Mapping[str, Any] | None,
        output_hidden_states: bool,
        *,
        stream: bool,
    ) -> PerceiverIOOutput:
        _check_subsampling(self.decoder, subsampled_output_points)
        query_mask = as_bool_mask(query_mask, "query_mask")
        if query_mask is not None:
            check_like(query_mask, self, "query_mask")
        states: list[Tensor] | None = [] if output_hidden_states else None
        encoded = self._encode(inputs, input_mask, states, stream=stream)
        logits = None if self.decoder is None else self._decode(encoded, query_mask, subsampled_output_points,
                                                                  query_kwargs)
        return PerceiverIOOutput(logits=logits, last_hidden_state=encoded.latents,
                                 hidden_states=None if states is None else tuple(states))

    def decode_chunks(
        self,
        inputs: Tensor | Mapping[str, Tensor],
        chunks: Iterable[Tensor | Mapping[str, Tensor | None]],
        *,
        input_mask: Tensor | None = None,
        query_kwargs: Mapping[str, Any] | None = None,
    ) -> Iterator[Any]:
        """Encode ``inputs`` once, then decode each of ``chunks`` (``subsampled_output_points`` values) in
        turn: the decoder outputs (after the postprocessor) one chunk at a time, as
        ``forward(inputs, subsampled_output_points=chunk).logits`` gives them, without running the
        encoder again for every chunk (the official chunked decoding re-encodes each time) and without the
        whole query set's queries at once. Refused for decoders with query self-attention, like
        ``subsampled_output_points``."""
        if self.decoder is None:
            raise ValueError("decode_chunks needs a decoder; this model returns the latents")
        encoded = None
        for points in chunks:
            _check_subsampling(self.decoder, points)
            if encoded is None:
                encoded = self._encode(inputs, input_mask, None, stream=True)
            yield self._decode(encoded, None, points, query_kwargs)

    def _encode(self, inputs: Tensor | Mapping[str, Tensor], input_mask: Tensor | None,
                states: list[Tensor] | None, *, stream: bool) -> _Encoded:
        """Preprocessor and encoder: the tokens (what the decoder's queries may read) and the latents."""
        self._check_inputs(inputs)
        input_mask = as_bool_mask(input_mask, "input_mask")
        if input_mask is not None:
            check_like(input_mask, self, "input_mask")
        if self.input_preprocessor is not None:
            size = self._stream_size(inputs, masked=input_mask is not None) if stream else 0
            if size:  # x is a ContextStream: the encoder attends it chunk by chunk
                x, modality_sizes, without_pos = self.input_preprocessor(inputs, chunk_size=size)
            else:
                x, modality_sizes, without_pos = self.input_preprocessor(inputs)
        else:
            check_tensor(inputs, "inputs", kind="float", layout="[batch, tokens, channels] (without an input "
                         "preprocessor: embed token ids or other integers first)")
            if inputs.ndim != 3:
                raise ValueError("without an input preprocessor, inputs must be a [batch, tokens, channels] tensor, "
                                 f"got shape {tuple(inputs.shape)}")
            x, modality_sizes, without_pos = inputs, None, None
        latents = self.encoder(x, mask=input_mask, hidden_states=states)
        return _Encoded(x, modality_sizes, without_pos, latents)

    def _decode(self, encoded: _Encoded, query_mask: Tensor | None,
                points: Tensor | Mapping[str, Tensor | None] | None, query_kwargs: Mapping[str, Any] | None) -> Any:
        """Queries, decoder and postprocessor on what :meth:`_encode` gave."""
        # the decoders built on BasicDecoder take their Fourier queries as a stream, built chunk by chunk
        stream = {"stream": True} if isinstance(self.decoder, _QUERY_STREAMING_DECODERS) else {}
        query = self.decoder.decoder_query(
            encoded.tokens, modality_sizes=encoded.modality_sizes, inputs_without_pos=encoded.without_pos,
            subsampled_points=points, **stream, **dict(query_kwargs or {}),
        )
        post = self.output_postprocessor
        if isinstance(post, MultimodalPostprocessor) and isinstance(self.decoder, MultimodalDecoder):
            # each modality's rows go through its postprocessor's row-wise step as they are decoded
            decoded = self.decoder.decode_modalities(query, encoded.latents, self.decoder.output_modality_sizes(points),
                                                     heads=post.heads(), query_mask=query_mask)
            return post.assemble(decoded)
        rowwise = rowwise_parts(post) if self._decoder_takes_head else None
        if rowwise is not None:  # the postprocessor's row-wise step runs on each decoded chunk
            return rowwise[1](self.decoder(query, encoded.latents, query_mask=query_mask, head=rowwise[0]))
        if self._decoder_takes_points:
            out = self.decoder(query, encoded.latents, query_mask=query_mask, subsampled_points=points)
        else:
            out = self.decoder(query, encoded.latents, query_mask=query_mask)
        if post is None:
            return out
        if self._post_takes_sizes:
            sizes = self.decoder.output_modality_sizes(points) or encoded.modality_sizes
            return post(out, modality_sizes=sizes)
        return post(out)


class _Encoded(NamedTuple):
    """What the encoder stage hands the decoder stage."""

    tokens: Any  # the preprocessed inputs [B, M, C] (or their ContextStream)
    modality_sizes: Any
    without_pos: Any
    latents: Tensor


_DECODERS = (BasicDecoder, ClassificationDecoder, FlowDecoder, MultimodalDecoder, ProjectionDecoder,
             VideoAutoencodingDecoder)
_QUERY_STREAMING_DECODERS = (BasicDecoder, FlowDecoder, MultimodalDecoder, VideoAutoencodingDecoder)


def _check_subsampling(decoder: nn.Module | None, points: Tensor | Mapping[str, Tensor | None] | None) -> None:
    """Refuse subsampled decoding with a decoder whose queries attend each other."""
    given = [m for m, p in points.items() if p is not None] if isinstance(points, Mapping) else points is not None
    if given and couples_queries(decoder):
        raise ValueError(
            "subsampled_output_points" + (f" (for {given})" if isinstance(given, list) else "")
            + " cannot be used with a decoder that has query self-attention (num_self_attends_per_cross > 0): "
            "every output then depends on all the queries, so decoding a subset (or chunk by chunk) would change "
            "each output; decode the whole query set (subsampled_output_points=None) instead"
        )


def decoder_reads_inputs(decoder: nn.Module | None) -> bool:
    """Whether the decoder needs the preprocessed inputs whole, not only their batch size, dtype and
    device (then the inputs are not streamed).

    True for queries concatenated with the inputs (``concat_preprocessed_input``), for queries made of
    the inputs (:class:`~perceivers.io.InputQueries`) that attend each other, and for decoders of
    other classes unless they declare ``reads_inputs = False``. Independent queries made of the
    inputs (optical flow) take them as a :class:`~perceivers.layers.ContextStream`: the decoder
    builds each chunk of queries from it.
    """
    if decoder is None:
        return False
    declared = getattr(decoder, "reads_inputs", None)
    if declared is not None:
        return bool(declared)
    if type(decoder) not in _DECODERS:
        return True
    basic = decoder.decoder if isinstance(decoder, FlowDecoder) else decoder
    if isinstance(basic, BasicDecoder) and isinstance(basic.queries, InputQueries):
        return basic.concat_preprocessed_input or couples_queries(basic)
    return any(isinstance(m, InputQueries) or (isinstance(m, BasicDecoder) and m.concat_preprocessed_input)
               for m in decoder.modules())
