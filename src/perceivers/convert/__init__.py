from .lucidrains import detect_family, from_lucidrains
from .lucidrains_variants import detect_variant, from_lucidrains_variant
from .multimodal_fork import from_multimodality_fork

__all__ = ["detect_family", "detect_variant", "from_lucidrains", "from_lucidrains_variant", "from_multimodality_fork"]
