"""Run by test_krasserm.py in a subprocess (krasserm's package imports pytorch_lightning, kept out of the
test process): tiny DeepMind-layout models built by the benchmark's builders with the same weights in
perceivers, transformers and krasserm's perceiver-io; prints each one's largest difference to transformers."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import workloads as W

VISION = dict(W.VISION_REDUCED, num_latents=16, d_latents=32, num_blocks=1, num_self_attends_per_block=2,
              num_self_attention_heads=2, num_labels=7)
LANGUAGE = dict(W.LANGUAGE_REDUCED, num_latents=16, d_latents=32, d_model=32, num_self_attends_per_block=2,
                v_channels=32, num_self_attention_heads=2, num_cross_attention_heads=2, max_position_embeddings=48)

out = {}
for wl in (W.vision_workload("vision", VISION, 24, 2, train=False), W.language_workload("language", LANGUAGE, 2)):
    inputs = wl.inputs(wl.batch, torch.device("cpu"))
    outputs = {}
    for impl in wl.impls:
        built = wl.build(impl, torch.device("cpu"))
        with torch.no_grad():
            outputs[impl] = built.run(built.model.eval(), inputs).float()
    ref = outputs[W.HF]
    out[wl.name] = {"diff": {k: (v - ref).abs().max().item() for k, v in outputs.items()},
                    "scale": ref.abs().max().item(), "shape": list(ref.shape)}
print("RESULT " + json.dumps(out))
