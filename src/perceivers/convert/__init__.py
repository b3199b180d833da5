from .lucidrains import detect_family, from_lucidrains
from .multimodal_fork import from_multimodality_fork

__all__ = ["detect_family", "from_lucidrains", "from_multimodality_fork"]
