"""perceiver-pytorch's experimental Perceivers under their original names.

``from perceivers.experimental import Perceiver`` mirrors ``from perceiver_pytorch.experimental import Perceiver``:

* :class:`Perceiver` — the bottom-up (ISAB-style) Perceiver (:class:`perceivers.models.experimental.BottomUpPerceiver`),
  with working Fourier features and masks;
* :class:`GatedPerceiver` — GRU-gated attention updates (``perceiver_pytorch.gated.Perceiver``);
* :class:`MixedLatentsPerceiver` — latent-axis MLP instead of latent attention (``perceiver_pytorch.mixed_latents``).

Weights from perceiver-pytorch convert with :func:`perceivers.convert.from_lucidrains_variant`.
"""

from .models.experimental import BottomUpPerceiver, LinearAttention
from .models.variants import GatedPerceiver, MixedLatentsPerceiver

Perceiver = BottomUpPerceiver

__all__ = ["BottomUpPerceiver", "GatedPerceiver", "LinearAttention", "MixedLatentsPerceiver", "Perceiver"]
