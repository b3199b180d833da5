"""Run perceiver-multi-modality-pytorch (the fork) on random weights and save what it computed.

Usage: ``python _multimodality_fork_reference.py CASES.json OUT.pt`` with the fork first on ``PYTHONPATH`` (it
installs as ``perceiver_pytorch``, the name perceiver-pytorch uses). Every case in the JSON list is a dict::

    {"name": str, "cls": "MultiModalityPerceiver" | "MultiModalityPerceiverNoPooling"
     | "MultiModalityWithTextPerceiver" | "HierarchicalMultiModalityPerceiver"
     | "HierarchicalMultiModalityPerceiverNoPooling",
     "modalities": [[name, channels, axis, bands, max_freq, base], ...],
     "embeddings": {name: [vocab, dim]}, "kwargs": {...}, "shapes": {name: [B, *axes, C]}, "mask": bool,
     "configurator": [depth, num_latents_begin, latent_dim_begin]  (hierarchical classes only)}

or, for the fork's top-level models, ``{"name", "cls": "Perceiver" | "GatedPerceiver", "kwargs", "shape": [B, *axes, C],
"mask": bool}`` (``perceiver_pytorch.Perceiver`` / ``perceiver_pytorch.gated.Perceiver`` on one grid input).

``OUT.pt`` holds ``{name: {"state_dict", "inputs", "mask", "output"}}`` (tensors only, for weights_only loading).
Tests import :data:`REF` and :func:`run_fork` from here (the fork itself is imported only in the subprocess).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

REF = Path(__file__).resolve().parents[2] / ".venv" / "refs" / "perceiver-multi-modality-pytorch-1.4.0"


def run_fork(cases: list[dict], folder: Path) -> dict:
    """Run ``cases`` through the fork in a subprocess; its results, loaded with ``weights_only=True``."""
    cases_path, out = folder / "cases.json", folder / "out.pt"
    cases_path.write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(REF), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(cases_path), str(out)], env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def randomise(model: nn.Module, generator: torch.Generator) -> None:
    """Every parameter random, norms and biases included, with magnitudes that keep activations O(1)."""

    def noise(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=generator)

    with torch.no_grad():
        done = set()
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1.0 + 0.2 * noise(module.weight))
                module.bias.copy_(0.2 * noise(module.bias))
                done |= {id(module.weight), id(module.bias)}
        for name, p in model.named_parameters():
            if id(p) in done:
                continue
            if p.ndim == 1:  # biases
                p.copy_(0.2 * noise(p))
            elif name == "latents" or name.startswith(("latents.", "embeddings.")):
                p.copy_(noise(p))
            else:  # weights: fan-in scaling
                p.copy_(noise(p) / p[0].numel() ** 0.5)


def _seed(case: dict) -> torch.Generator:
    torch.manual_seed(case.get("seed", 0))
    return torch.Generator().manual_seed(case.get("seed", 0))


def run_grid_case(case: dict) -> dict:
    import perceiver_pytorch.perceiver_pytorch as plain
    from perceiver_pytorch import gated

    generator = _seed(case)
    model = (plain if case["cls"] == "Perceiver" else gated).Perceiver(**case["kwargs"])
    randomise(model, generator)
    model.eval()
    data = torch.randn(case["shape"], generator=generator)
    mask = torch.rand(case["shape"][:-1], generator=generator) > 0.3 if case.get("mask") else None
    return _run(model, data, mask)


def run_case(case: dict) -> dict:
    if case["cls"] in ("Perceiver", "GatedPerceiver"):
        return run_grid_case(case)
    import perceiver_pytorch.hierarchical_multi_modality_perceiver as hm
    import perceiver_pytorch.multi_modality_perceiver as mm
    import perceiver_pytorch.multi_modality_with_text_perceiver as mt
    from perceiver_pytorch.modalities import InputModality, InputModalityWithEmbedding

    generator = _seed(case)
    embeddings = case.get("embeddings", {})
    modalities = []
    for name, channels, axis, bands, max_freq, base in case["modalities"]:
        if case["cls"] == "MultiModalityWithTextPerceiver":
            emb = nn.Embedding(*embeddings[name]) if name in embeddings else None
            modalities.append(InputModalityWithEmbedding(name, channels, axis, bands, max_freq, base, embedding=emb))
        else:
            modalities.append(InputModality(name, channels, axis, bands, max_freq, base))
    kwargs = dict(case["kwargs"])
    if case["cls"].startswith("Hierarchical"):
        module = hm
        kwargs["configurator"] = hm.HierarchicalConfigurator(*case["configurator"])
    else:
        module = mt if case["cls"] == "MultiModalityWithTextPerceiver" else mm
    model = getattr(module, case["cls"])(modalities=modalities, **kwargs)
    randomise(model, generator)
    model.eval()

    inputs = {}
    for name, shape in case["shapes"].items():
        if name in embeddings:
            inputs[name] = torch.randint(0, embeddings[name][0], shape, generator=generator)
        else:
            inputs[name] = torch.randn(shape, generator=generator)
    mask = None
    if case.get("mask"):
        batch = next(iter(case["shapes"].values()))[0]
        total = sum(torch.Size(s[1:-1]).numel() for s in case["shapes"].values())
        mask = torch.rand(batch, total, generator=generator) > 0.3
        mask[:, 0] = True
    return _run(model, inputs, mask)


def _run(model: nn.Module, inputs, mask: torch.Tensor | None) -> dict:
    """The model's weights, inputs, mask and output, as saved for the tests."""
    with torch.no_grad():
        output = model(inputs, mask=mask)
    result = {"state_dict": dict(model.state_dict()), "inputs": inputs, "output": output}
    if mask is not None:
        result["mask"] = mask
    return result


def main() -> None:
    cases_path, out_path = sys.argv[1:3]
    with open(cases_path) as f:
        cases = json.load(f)
    torch.save({case["name"]: run_case(case) for case in cases}, out_path)


if __name__ == "__main__":
    main()
