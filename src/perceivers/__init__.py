"""perceivers: DeepMind's Perceiver family in PyTorch — complete, exact and fast.

Importing this package loads only torch, einops and numpy; training, export and reference
libraries are imported by the submodules that need them.
"""

from .models import Perceiver, PerceiverBlock, PerceiverIO, PerceiverLM

__version__ = "0.1.0"

__all__ = ["Perceiver", "PerceiverBlock", "PerceiverIO", "PerceiverLM", "__version__"]
