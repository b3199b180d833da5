"""Makes krasserm's perceiver-io importable in a reference subprocess (``_perceiver_ar_*reference.py``)."""

import sys
import types
from pathlib import Path


def use_krasserm(version: str) -> None:
    """Put ``.venv/refs/perceiver-io-<version>`` on the path. Its core modules import fairscale's
    ``checkpoint_wrapper`` at import time and call it only with activation checkpointing (never set
    here): when fairscale is missing, a stand-in that refuses to be called replaces it."""
    sys.path.append(str(Path(sys.prefix) / "refs" / f"perceiver-io-{version}"))
    if "fairscale" in sys.modules:
        return
    try:
        import fairscale.nn  # noqa: F401
    except ImportError:
        def _refuse(*args, **kwargs):
            raise NotImplementedError("activation checkpointing of krasserm/perceiver-io needs fairscale")

        fs, fs_nn = types.ModuleType("fairscale"), types.ModuleType("fairscale.nn")
        fs_nn.checkpoint_wrapper, fs.nn = _refuse, fs_nn
        sys.modules.update({"fairscale": fs, "fairscale.nn": fs_nn})
