"""The multi-modality fork's ``perceiver_pytorch`` names, with the fork's defaults.

``perceiver-multi-modality-pytorch`` (1.4.0) installs as ``perceiver_pytorch``, and its top-level
``Perceiver`` is perceiver-pytorch's early model: log-spaced Fourier bands (``freq_base=2``, lowest band 2),
one self-attention per cross-attention. Changing the import line is enough::

    from perceiver_pytorch import Perceiver                  # the fork
    from perceivers.multimodality_fork import Perceiver      # the same model and outputs

:class:`Perceiver` and :class:`GatedPerceiver` (``perceiver_pytorch.gated.Perceiver``) are
:class:`perceivers.Perceiver` and :class:`perceivers.GatedPerceiver` with ``freq_base=2`` by default; the
multi-modality classes are re-exported. The fork's weights convert with
:func:`perceivers.convert.from_lucidrains` (``Perceiver``), :func:`~perceivers.convert.from_lucidrains_variant`
(``gated``) and :func:`~perceivers.convert.from_multimodality_fork` (the multi-modality models). The fork's
``perceiver_pytorch.experimental.Perceiver`` cannot be built (its head names an undefined ``RMSNorm``);
perceiver-pytorch's bottom-up model is :class:`perceivers.experimental.Perceiver`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn

from .configurable import configurable
from .models import perceiver, variants
from .models.common import ClassifierHead
from .models.multimodal import (
    HierarchicalConfigurator,
    HierarchicalMultiModalityPerceiver,
    HierarchicalMultiModalityPerceiverNoPooling,
    InputModality,
    InputModalityWithEmbedding,
    MultiModalityPerceiver,
    MultiModalityPerceiverNoPooling,
    MultiModalityWithTextPerceiver,
)

__all__ = [
    "GatedPerceiver",
    "HierarchicalConfigurator",
    "HierarchicalMultiModalityPerceiver",
    "HierarchicalMultiModalityPerceiverNoPooling",
    "InputModality",
    "InputModalityWithEmbedding",
    "MultiModalityPerceiver",
    "MultiModalityPerceiverNoPooling",
    "MultiModalityWithTextPerceiver",
    "Perceiver",
]

@configurable
class Perceiver(perceiver.Perceiver):
    """The fork's ``perceiver_pytorch.Perceiver``: :class:`perceivers.Perceiver` with ``freq_base=2``.

    As in the fork, the latents are pooled (mean) *before* ``to_logits``, which is ``LayerNorm → Linear``
    (``to_logits[0]``, ``to_logits[1]``; ``to_logits = nn.Identity()`` returns the pooled ``[B, D]``).
    ``perceivers.Perceiver`` pools inside its ``to_logits``, as later perceiver-pytorch versions do.
    """

    def __init__(self, *, freq_base: float | None = 2, **kwargs: Any) -> None:
        super().__init__(freq_base=freq_base, **kwargs)
        self.pool_before_head = isinstance(self.head, ClassifierHead)  # False with final_classifier_head=False
        if self.pool_before_head:  # the same norm and projection (keys head.norm.*, head.proj.*), without the pool
            self.head = nn.Sequential(OrderedDict(norm=self.head.norm, proj=self.head.proj))

    def forward(self, data: Tensor, mask: Tensor | None = None, return_embeddings: bool = False, *args: Any,
                **kwargs: Any) -> Tensor | tuple[Tensor, list[Tensor]]:
        """As :meth:`perceivers.Perceiver.forward`; the head gets the mean of the latents ``[B, D]``."""
        out = super().forward(data, mask, return_embeddings or self.pool_before_head, *args, **kwargs)
        if return_embeddings or not self.pool_before_head:
            return out
        if isinstance(out, tuple):  # return_hiddens
            return self.head(out[0].mean(dim=-2)), out[1]
        return self.head(out.mean(dim=-2))


@configurable
class GatedPerceiver(variants.GatedPerceiver):
    """The fork's ``perceiver_pytorch.gated.Perceiver``: :class:`perceivers.GatedPerceiver` with ``freq_base=2``.

    ``cross_dim`` is accepted and unused, as in the fork.
    """

    def __init__(self, *, freq_base: float | None = 2, cross_dim: int | None = None, **kwargs: Any) -> None:
        super().__init__(freq_base=freq_base, **kwargs)
