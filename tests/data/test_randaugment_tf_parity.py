"""RandAugment ops against TensorFlow's outputs as DeepMind's Perceiver IO training ran them, uint8-exact.

``randaugment_tf_reference.npz`` holds TF's output of every op at magnitudes 2, 5 and 10 (both signs of the
signed ops, two Cutout centres) on two small natural photographs, recorded by
``scripts/make_randaugment_tf_reference.py`` (needs TensorFlow + tf-models-official; not run here), and
DeepMind's level-to-argument table. No tolerance: every output pixel must be equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from perceivers.data.transforms import RANDAUGMENT_OPS, RandAugment

REFERENCE = np.load(Path(__file__).with_name("randaugment_tf_reference.npz"))
INPUTS = {k.split("/", 1)[1]: REFERENCE[k] for k in REFERENCE.files if k.startswith("input/")}
CASES = sorted(k for k in REFERENCE.files if k.split("/", 1)[0] in INPUTS)
TRANSLATE_CONST, CUTOUT_CONST = 10.0, 8.0  # what the script recorded with (small images)


def test_reference_covers_every_op_at_every_magnitude():
    recorded = {tuple(k.split("/")[1:3]) for k in CASES}
    assert recorded == {(op, str(m)) for op in RANDAUGMENT_OPS for m in (2, 5, 10)}
    assert {img.shape for img in INPUTS.values()} == {(24, 24, 3), (20, 28, 3)}


@pytest.mark.parametrize("key", CASES)
def test_op_matches_tensorflow_exactly(key):
    name, op, magnitude, *rest = key.split("/")
    ra = RandAugment(1, float(magnitude), translate_const=TRANSLATE_CONST, cutout_const=CUTOUT_CONST)
    image = torch.from_numpy(INPUTS[name])[None]
    kwargs: dict = {"negate": False}
    if op == "Cutout":
        kwargs["centers"] = torch.tensor([[int(v) for v in rest[0].split("_")]])
    elif rest:
        kwargs["negate"] = rest[0] == "-1"
    ours = ra.apply_op(image, op, **kwargs)[0].numpy()
    want = REFERENCE[key]
    diff = np.abs(ours.astype(np.int64) - want.astype(np.int64))
    assert diff.max() == 0, f"{key}: {int((diff > 0).any(-1).sum())} pixels differ, by up to {diff.max()}"


def test_float_batches_take_the_same_path():
    # float input in [0, 1] is quantised to the same levels, so it reproduces TF as well
    key = "china/Sharpness/10"
    out = RandAugment(1, 10.0).apply_op(torch.from_numpy(INPUTS["china"])[None].float() / 255, "Sharpness")
    assert torch.equal((out[0] * 255).round().to(torch.uint8), torch.from_numpy(REFERENCE[key]))


def test_sharpness_smooths_flat_areas_like_tensorflow():
    # TF's float32 sum of a flat area lands one level low for 53 of the 256 levels (30 -> 29, ...)
    from perceivers.data.transforms import _sharpen_degenerate

    levels = torch.arange(256, dtype=torch.float32).reshape(256, 1, 1, 1).expand(256, 3, 3, 3)
    ours = _sharpen_degenerate(levels)[:, 1, 1, 0]
    want = torch.from_numpy(REFERENCE["sharpness/flat_levels"].astype(np.float32))
    assert torch.equal(ours, want) and int((want < torch.arange(256)).sum()) == 53


def test_level_to_argument_table_matches_deepmind():
    ops = [str(op) for op in REFERENCE["levels/ops"]]
    for magnitude, row in zip(REFERENCE["levels/magnitude"], REFERENCE["levels/arguments"]):
        ra = RandAugment(1, float(magnitude))
        for op, want in zip(ops, row):
            assert ra.argument(op) == pytest.approx(want, abs=1e-12), (op, magnitude)
