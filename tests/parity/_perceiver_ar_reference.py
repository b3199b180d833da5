"""Run by test_perceiver_ar.py in a subprocess (krasserm's package imports pytorch_lightning, kept out of
the test process): builds tiny seeded krasserm ``CausalLanguageModel``s (perceiver-io 0.6.0) with every
parameter randomised, and saves their state dicts, inputs and outputs (eval and training forwards,
``generate``) to the folder given as the first argument."""

import sys
import warnings
from pathlib import Path

import torch
from _krasserm_env import use_krasserm

use_krasserm("0.6.0")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from perceiver.model.text.clm import CausalLanguageModel, CausalLanguageModelConfig

# name -> (config fields, batch, sequence length); see test_perceiver_ar.py
CASES = {
    "small": ({"vocab_size": 50, "max_seq_len": 24, "num_latents": 8, "num_channels": 32, "num_heads": 4,
               "num_self_attention_layers": 2}, 2, 20),
    "wide_heads": ({"vocab_size": 40, "max_seq_len": 32, "num_latents": 6, "num_channels": 32, "num_heads": 2,
                    "num_self_attention_layers": 3, "widening_factor": 2, "cross_attention_dropout": 0.25,
                    "random_sequence_truncation": True}, 3, 32),
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm weights around 1), so a tensor the converter skips shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight") or name.endswith(".0.weight") and p.ndim == 1:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def main(out: Path) -> None:
    for i, (name, (fields, batch, length)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        model = CausalLanguageModel(CausalLanguageModelConfig(**fields))
        randomise(model, 100 + i)
        ids = torch.randint(0, fields["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(i))
        res = {"fields": fields, "state": model.state_dict(), "ids": ids}
        model.eval()
        with torch.no_grad():
            res["eval"] = model(ids)
        model.train()
        torch.manual_seed(1000 + i)  # prefix dropout (and truncation) draw from the global generator
        with torch.no_grad():
            res["train"] = model(ids)
        model.eval()
        gens = []
        for seed, prompt_len, num, threshold, temperature in [(7, 10, 6, 0.5, 0.8), (8, 4, 5, 0.0, 1.0),
                                                               (9, length - 2, 12, 0.9, 1.3)]:
            prompt = ids[:, :prompt_len]
            torch.manual_seed(seed)
            tokens = model.generate(num=num, prompt=prompt, threshold=threshold, temperature=temperature)
            gens.append({"seed": seed, "prompt": prompt, "num": num, "threshold": threshold,
                         "temperature": temperature, "tokens": tokens})
        res["generate"] = gens
        model.train()  # generate on a training model: each step the training forward (dropout, truncation)
        gens = []
        for seed, prompt_len, num in [(11, 10, 6), (12, length - 2, 12)]:
            prompt = ids[:, :prompt_len]
            torch.manual_seed(seed)
            tokens = model.generate(num=num, prompt=prompt, threshold=0.5, temperature=1.0)
            gens.append({"seed": seed, "prompt": prompt, "num": num, "threshold": 0.5, "temperature": 1.0,
                         "tokens": tokens})
        res["generate_train"] = gens
        torch.save(res, out / f"{name}.pt")
    print("DONE")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
