"""Parity with krasserm's perceiver-io 0.6.0 (the benchmark's DeepMind-family peer) and transformers.

``make setup`` installs it with ``--no-deps`` into ``.venv/refs/``; it imports pytorch_lightning, so it
runs in a subprocess (``_krasserm_reference.py``) with the benchmark's weight mapping, and this test checks
that perceivers, krasserm's modules and transformers give the same outputs for the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REF = Path(sys.prefix) / "refs" / "perceiver-io-0.6.0" / "perceiver"
SCRIPT = Path(__file__).with_name("_krasserm_reference.py")


@pytest.mark.skipif(not REF.is_dir(), reason=f"{REF.parent} missing (make setup installs it)")
def test_same_weights_same_outputs_as_krasserm_and_transformers():
    proc = subprocess.run([sys.executable, str(SCRIPT)], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-2000:]
    results = json.loads(lines[0][7:])
    assert results["vision"]["shape"] == [2, 7] and results["language"]["shape"] == [2, 48, 262]
    for name, res in results.items():
        assert set(res["diff"]) == {"perceivers", "transformers", "krasserm/perceiver-io"}
        assert res["scale"] > 0
        for impl, diff in res["diff"].items():
            assert diff <= 1e-5 * res["scale"] + 1e-7, (name, impl, diff, res["scale"])


@pytest.mark.skipif(not REF.is_dir(), reason=f"{REF.parent} missing (make setup installs it)")
def test_a_0_6_image_classifier_state_dict_loads():
    """0.6.0 kept the image adapter's Fourier features as its own buffer; they are renamed on load."""
    script = Path(__file__).with_name("_krasserm_06_image.py")
    proc = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-2000:]
    result = json.loads(lines[0][7:])
    assert result["diff"] <= 1e-5 * result["scale"], result


def test_image_classifier_warns_that_it_uses_one_query():
    from perceivers import krasserm

    encoder = krasserm.ImageEncoderConfig(image_shape=(4, 4, 3), num_frequency_bands=2, num_cross_attention_heads=1,
                                          num_self_attention_heads=2)
    decoder = krasserm.ClassificationDecoderConfig(num_classes=3, num_output_queries=2, num_cross_attention_heads=1)
    config = krasserm.ImageClassifierConfig(encoder, decoder, num_latents=2, num_latent_channels=8)
    with pytest.warns(UserWarning, match="num_output_queries=2 is ignored"):
        krasserm.ImageClassifier(config)
