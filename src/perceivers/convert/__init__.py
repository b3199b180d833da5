from .lucidrains import detect_family, from_lucidrains

__all__ = ["detect_family", "from_lucidrains"]
