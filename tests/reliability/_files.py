"""Valid, hostile and damaged checkpoint files for every loader (shared by the tests and the report).

``make_valid(tmp)`` writes one checkpoint per format from tiny models; ``LOADERS`` load each of them
the way a user would; ``hostile_payloads`` are pickles whose unpickling would run code (touch a
marker file); ``damage`` truncates or flips bytes.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from perceivers import create_model, from_pretrained, load_checkpoint, save_pretrained
from perceivers.convert.haiku import haiku_key_table, load_haiku_checkpoint
from perceivers.convert.state_dict import read_state_dict, save_state_dict
from perceivers.convert.transformers import from_transformers, save_transformers

VISION = ("vision-perceiver-conv", {"tiny": True})
# tiny sizes transformers can express (it hard-codes a few)
TEXT = ("language-perceiver", {"tiny": True, "num_decoder_heads": 8, "decoder_qk_channels": 256,
                               "decoder_v_channels": 16})

_INVERSE = {"none": lambda a: a, "linear": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 1, 0),
            "squeeze": lambda a: a.reshape(1, 1, 1, -1)}


def model(spec=VISION, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    name, kw = spec
    m = create_model(name, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def haiku_tree(m: torch.nn.Module) -> dict:
    """Our weights in DeepMind's Haiku layout (``{module: {param: ndarray}}``), via the key table."""
    sd = m.state_dict()
    tree: dict = {}
    for rule in haiku_key_table(m):
        if rule.ours is not None:
            module, _, param = rule.haiku.rpartition("/")
            tree.setdefault(module, {})[param] = _INVERSE[rule.transform](sd[rule.ours].numpy())
    return tree


def make_valid(tmp: Path) -> dict[str, Path]:
    """format → the file a loader reads (directories for directory formats)."""
    vision, text = model(VISION), model(TEXT)
    out = {}
    out["haiku"] = tmp / "official.pystate"
    out["haiku"].write_bytes(pickle.dumps({"params": haiku_tree(vision), "state": {}}))
    out["perceivers"] = save_pretrained(vision, tmp / "ours")
    out["safetensors"] = tmp / "weights.safetensors"
    save_state_dict(vision.state_dict(), out["safetensors"])
    out["torch"] = tmp / "weights.pt"
    torch.save(vision.state_dict(), out["torch"])
    out["transformers"] = save_transformers(text, tmp / "hf")
    out["transformers-bin"] = tmp / "hf-bin"
    out["transformers-bin"].mkdir()
    shutil.copy(out["transformers"] / "config.json", out["transformers-bin"] / "config.json")
    torch.save(read_state_dict(out["transformers"] / "model.safetensors"), out["transformers-bin"] / "pytorch_model.bin")
    out["lightning"] = tmp / "last.ckpt"  # a training checkpoint: {"state_dict": {"model.<ours>": ...}, ...}
    torch.save({"state_dict": dict(vision.state_dict()), "epoch": 1, "global_step": 7}, out["lightning"])
    return out


# The file inside each format that damage is applied to (directories: their weights or config).
def targets(files: dict[str, Path]) -> dict[str, Path]:
    return {
        "haiku": files["haiku"],
        "perceivers": files["perceivers"] / "model.safetensors",
        "perceivers-config": files["perceivers"] / "config.json",
        "safetensors": files["safetensors"],
        "torch": files["torch"],
        "transformers": files["transformers"] / "model.safetensors",
        "transformers-config": files["transformers"] / "config.json",
        "transformers-bin": files["transformers-bin"] / "pytorch_model.bin",
        "lightning": files["lightning"],
    }


def _into(spec) -> Callable[[Path], torch.nn.Module]:
    def load(path: Path) -> torch.nn.Module:
        return load_checkpoint(create_model(spec[0], **spec[1]), path)

    return load


# target name → (how a user loads it, the reference model spec)
LOADERS: dict[str, tuple[Callable[[dict[str, Path]], torch.nn.Module], tuple]] = {
    "haiku": (lambda f: load_haiku_checkpoint(create_model(VISION[0], **VISION[1]), f["haiku"]), VISION),
    "perceivers": (lambda f: from_pretrained(f["perceivers"]), VISION),
    "perceivers-config": (lambda f: from_pretrained(f["perceivers"]), VISION),
    "safetensors": (lambda f: _into(VISION)(f["safetensors"]), VISION),
    "torch": (lambda f: _into(VISION)(f["torch"]), VISION),
    "transformers": (lambda f: from_transformers(f["transformers"]), TEXT),
    "transformers-config": (lambda f: from_pretrained(f["transformers"]), TEXT),
    "transformers-bin": (lambda f: _into(TEXT)(f["transformers-bin"]), TEXT),
    "lightning": (lambda f: _into(VISION)(f["lightning"]), VISION),
}
# formats whose payload carries a checksum (our safetensors digest, the zip CRC of torch.save files)
CHECKSUMMED = {"perceivers", "safetensors", "torch", "transformers", "transformers-bin", "lightning"}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------- hostile payloads


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Evaluates:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


class Imports:
    """``__reduce__`` to ``builtins.__import__('os').system``, spelled via getattr."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import os; os.system('touch {self.marker}')",)


PAYLOADS = {"os.system": RunsShell, "eval": Evaluates, "exec": Imports}


def hostile_files(tmp: Path, marker: Path, payload: type) -> dict[str, Path]:
    """One code-carrying file per loader, each hiding ``payload`` inside an otherwise plausible checkpoint."""
    evil = payload(marker)
    out: dict[str, Path] = {}
    out["haiku"] = tmp / "evil.pystate"
    out["haiku"].write_bytes(pickle.dumps({"params": {"embed": {"embeddings": evil}}, "state": {}}))
    out["torch"] = tmp / "evil.pt"
    torch.save({"weight": torch.zeros(2), "evil": evil}, out["torch"])
    out["torch-legacy"] = tmp / "evil_legacy.pt"  # the pre-1.6 plain-pickle torch.save format
    torch.save({"evil": evil}, out["torch-legacy"], _use_new_zipfile_serialization=False)
    out["lightning"] = tmp / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": evil}, out["lightning"])
    out["transformers"] = tmp / "evil-hf"
    out["transformers"].mkdir()
    (out["transformers"] / "config.json").write_text(
        '{"model_type": "perceiver", "architectures": ["PerceiverForMaskedLM"]}')
    torch.save({"perceiver.embeddings.latents": evil}, out["transformers"] / "pytorch_model.bin")
    out["pickle-as-bin"] = tmp / "evil.bin"  # a raw pickle with a torch suffix
    out["pickle-as-bin"].write_bytes(pickle.dumps(evil))
    return out


# --------------------------------------------------------------------------------------------- damage


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def flip_bytes(path: Path, seed: int, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(count):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def damage(path: Path, kind: str, seed: int = 0) -> None:
    """Damage a file in place: ``"empty"`` (0 bytes), ``"half"`` (truncated) or ``"flip"`` (bits flipped, seeded)."""
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "half":
        truncate(path)
    else:
        flip_bytes(path, seed)
