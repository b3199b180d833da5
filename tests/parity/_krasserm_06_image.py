"""Reference subprocess: a perceiver-io 0.6.0 ImageClassifier's state dict loads into ours (strict), same outputs.

Prints ``RESULT {"diff": …, "scale": …}``. 0.6.0 imports pytorch_lightning, hence a process of its own.
"""

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _krasserm_env import use_krasserm

warnings.simplefilter("ignore")
use_krasserm("0.6.0")
import perceiver.model.image.classifier as k06
from perceiver.model.core import PerceiverConfig
from perceiver.model.core.classifier import ClassificationDecoderConfig

from perceivers import krasserm

encoder = {"image_shape": (5, 4, 3), "num_frequency_bands": 3, "num_cross_attention_heads": 1,
           "num_self_attention_heads": 2, "num_self_attention_layers_per_block": 1}
decoder = {"num_classes": 4, "num_output_query_channels": 8, "num_cross_attention_heads": 2}
torch.manual_seed(0)
reference = k06.ImageClassifier(PerceiverConfig(k06.ImageEncoderConfig(**encoder),
                                                ClassificationDecoderConfig(**decoder), num_latents=3,
                                                num_latent_channels=8)).eval()
with torch.no_grad():
    for p in reference.parameters():
        p.normal_(0, 0.3)
ours = krasserm.ImageClassifier(krasserm.ImageClassifierConfig(
    krasserm.ImageEncoderConfig(**encoder), krasserm.ClassificationDecoderConfig(**decoder), num_latents=3,
    num_latent_channels=8)).eval()
ours.load_state_dict(reference.state_dict(), strict=True)
x = torch.randn(2, 5, 4, 3)
with torch.no_grad():
    want = reference(x)
    print("RESULT " + json.dumps({"diff": (ours(x) - want).abs().max().item(), "scale": want.abs().max().item()}))
