"""Run by test_krasserm_api.py in a subprocess: krasserm's perceiver-io 0.11.0 backend models (encoder,
decoder, ``PerceiverIO``, masked language model, text and image classifiers), tiny, seeded, with every
parameter randomised. Saves to the folder given as the first argument one ``<case>.pt`` per case with
the constructor arguments, the state dict, the inputs and the eval outputs (and, for ``mlm``, the
gradients of ``logits.square().mean()``).

Only the backend modules are imported (no transformers, no Lightning: see ``_backend_only``); fairscale is stubbed when missing.
"""

import dataclasses
import importlib
import sys
import types
import warnings
from pathlib import Path

import torch
from _krasserm_env import use_krasserm

use_krasserm("0.11.0")


def _backend_only() -> None:
    """The task packages' ``__init__`` import their Hugging Face and Lightning modules: stand-in packages
    (same folders, empty ``__init__``) let the ``backend`` modules import alone."""
    from perceiver.model import core

    root = Path(core.__file__).parents[1]
    for name in ("text", "text.common", "text.mlm", "text.classifier", "vision", "vision.image_classifier"):
        package = types.ModuleType(f"perceiver.model.{name}")
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[package.__name__] = package
    common = importlib.import_module("perceiver.model.text.common.backend")
    sys.modules["perceiver.model.text.common"].__dict__.update(
        TextEncoder=common.TextEncoder, TextEncoderConfig=common.TextEncoderConfig)


_backend_only()
from perceiver.model.core import (
    ClassificationDecoderConfig,
    ClassificationOutputAdapter,
    PerceiverDecoder,
    PerceiverEncoder,
    PerceiverIO,
    TokenInputAdapter,
    TrainableQueryProvider,
)
from perceiver.model.text.classifier.backend import TextClassifier, TextClassifierConfig
from perceiver.model.text.common.backend import TextEncoderConfig
from perceiver.model.text.mlm.backend import MaskedLanguageModel, MaskedLanguageModelConfig, TextDecoderConfig
from perceiver.model.vision.image_classifier.backend import (
    ImageClassifier,
    ImageClassifierConfig,
    ImageEncoderConfig,
)

VOCAB, SEQ = 30, 10
# encoder keywords: repeated cross-attention, unshared / shared first layers, several blocks, qk != v widths
ENCODERS = {
    "enc_unshared": {"num_latents": 5, "num_latent_channels": 16, "num_cross_attention_heads": 2,
                     "num_cross_attention_qk_channels": 8, "num_cross_attention_v_channels": 12,
                     "num_cross_attention_layers": 2, "first_cross_attention_layer_shared": False,
                     "cross_attention_widening_factor": 2, "num_self_attention_heads": 4,
                     "num_self_attention_qk_channels": 8, "num_self_attention_layers_per_block": 2,
                     "num_self_attention_blocks": 3, "first_self_attention_block_shared": False,
                     "self_attention_widening_factor": 3},
    "enc_shared": {"num_latents": 4, "num_latent_channels": 12, "num_cross_attention_heads": 1,
                   "num_cross_attention_layers": 3, "first_cross_attention_layer_shared": True,
                   "num_self_attention_heads": 3, "num_self_attention_v_channels": 6,
                   "num_self_attention_layers_per_block": 1, "num_self_attention_blocks": 3,
                   "first_self_attention_block_shared": True},
}
DECODER = {"num_cross_attention_heads": 2, "num_cross_attention_qk_channels": 8, "cross_attention_widening_factor": 2}
TEXT_ENC = {"vocab_size": VOCAB, "max_seq_len": SEQ, "num_input_channels": 12, "num_cross_attention_heads": 2,
            "num_self_attention_heads": 2, "num_self_attention_layers_per_block": 2, "num_self_attention_blocks": 2,
            "num_cross_attention_layers": 2, "cross_attention_widening_factor": 2}


def randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if p.ndim == 1 and name.endswith("weight") else 0.3 * noise)


def tokens_and_mask(seed: int, n: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (3, n), generator=g)
    pad = torch.zeros(3, n, dtype=torch.bool)
    pad[1, 5:], pad[2, 2:] = True, True  # right padding of two rows
    return x, pad


def save(out: Path, name: str, model, kwargs, inputs, outputs, **extra) -> None:
    if dataclasses.is_dataclass(kwargs):  # configs as nested dicts: the test process cannot unpickle krasserm's
        kwargs = dataclasses.asdict(kwargs)
    torch.save({"kwargs": kwargs, "state_dict": model.state_dict(), "inputs": inputs, "outputs": outputs, **extra},
               out / f"{name}.pt")


def main(out: Path) -> None:
    torch.manual_seed(0)
    for i, (name, kw) in enumerate(ENCODERS.items()):
        adapter = TokenInputAdapter(vocab_size=VOCAB, max_seq_len=SEQ, num_input_channels=10)
        encoder = PerceiverEncoder(adapter, **kw)
        decoder = PerceiverDecoder(
            ClassificationOutputAdapter(num_classes=7, num_output_query_channels=6),
            TrainableQueryProvider(num_queries=3, num_query_channels=6), num_latent_channels=kw["num_latent_channels"],
            **DECODER,
        )
        model = PerceiverIO(encoder, decoder).eval()
        randomise(model, 10 + i)
        x, pad = tokens_and_mask(20 + i)
        with torch.no_grad():
            latents, adapted = model.encoder(x, pad_mask=pad, return_adapted_input=True)
            outputs = {"latents": latents, "adapted": adapted, "logits": model.decoder(latents),
                   "latents_nopad": model.encoder(x)}
        save(out, name, model, kw, {"x": x, "pad_mask": pad}, outputs)

    config = MaskedLanguageModelConfig(
        TextEncoderConfig(**TEXT_ENC), TextDecoderConfig(vocab_size=VOCAB, max_seq_len=SEQ, num_cross_attention_heads=3,
                                                         cross_attention_residual=False),
        num_latents=4, num_latent_channels=16)
    model = MaskedLanguageModel(config).eval()
    randomise(model, 30)
    x, pad = tokens_and_mask(31)
    with torch.no_grad():
        logits = model(x, pad_mask=pad)
    model.zero_grad()
    model(x, pad_mask=pad).square().mean().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    save(out, "mlm", model, config, {"x": x, "pad_mask": pad}, {"logits": logits}, grads=grads)

    config = TextClassifierConfig(
        TextEncoderConfig(**TEXT_ENC),
        ClassificationDecoderConfig(num_output_query_channels=8, num_classes=5, num_cross_attention_heads=2),
        num_latents=4, num_latent_channels=16)
    model = TextClassifier(config).eval()
    randomise(model, 40)
    x, pad = tokens_and_mask(41)
    with torch.no_grad():
        logits = model(x, pad_mask=pad)
    save(out, "text_classifier", model, config, {"x": x, "pad_mask": pad}, {"logits": logits})

    config = ImageClassifierConfig(
        ImageEncoderConfig(image_shape=(6, 5, 3), num_frequency_bands=3, num_cross_attention_heads=1,
                           num_self_attention_heads=2, num_self_attention_layers_per_block=2,
                           num_self_attention_blocks=2, first_self_attention_block_shared=False),
        ClassificationDecoderConfig(num_output_query_channels=8, num_classes=4, num_cross_attention_heads=1),
        num_latents=4, num_latent_channels=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.meshgrid's indexing warning
        model = ImageClassifier(config).eval()
    randomise(model, 50)
    x = torch.randn(2, 6, 5, 3, generator=torch.Generator().manual_seed(51))
    with torch.no_grad():
        logits = model(x)
    save(out, "image_classifier", model, config, {"x": x}, {"logits": logits})
    print("DONE")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
