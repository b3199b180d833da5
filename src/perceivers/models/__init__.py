"""The perceiver-pytorch family: Perceiver, PerceiverIO, PerceiverLM and their variants."""

from .perceiver import Perceiver, PerceiverBlock
from .perceiver_io import PerceiverIO, PerceiverLM

__all__ = ["Perceiver", "PerceiverBlock", "PerceiverIO", "PerceiverLM"]
