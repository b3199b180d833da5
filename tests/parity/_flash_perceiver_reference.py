"""Run by test_flash_perceiver.py in a subprocess: builds tiny seeded FlashPerceiver 0.2.0 models (kklemon's
``flash-perceiver`` on flash-attn 2.8.3.post2, python parts only) with every parameter randomised, and saves
their state dicts, inputs, outputs, attention weights and (one case) gradients to the folder given as the
first argument.

FlashPerceiver imports flash-attn at module level, and flash-attn needs its CUDA extension, torchvision and
triton. On CPU with ``use_flash_attn=False`` (flash-attn's pure-torch attention) three stand-ins suffice:

* ``flash_attn_2_cuda``: an empty module (only imported, never called on this path);
* ``torchvision.ops.StochasticDepth``: flash-attn's ``Block`` builds it with p=0 (identity); the stand-in
  refuses any other p;
* ``flash_attn.ops.triton.rotary.apply_rotary`` (triton): replaced by flash-attn's own pure-torch reference
  ``flash_attn.layers.rotary.apply_rotary_emb_torch`` (same arguments; positions from offset 0).

Attention weights: with the published flash-attn, ``return_attn_weights=True`` fails (flash-attn's
``SelfAttention``/``CrossAttention`` take no such argument; FlashPerceiver relies on kklemon's unmerged
flash-attn PR #589). Here the reference runs without it, and the weights are recorded by wrapping those
two classes' ``forward``: the softmax of their own ``q``/``k`` computed as their torch path does
(``[B, H, Q, K]``, -10000 on masked keys), in call order.
"""

import sys
import types
from pathlib import Path

import torch

REFS = Path(sys.prefix) / "refs" / "flash-perceiver-0.2.0"
sys.path.insert(0, str(REFS))


def _install_stand_ins() -> None:
    sys.modules.setdefault("flash_attn_2_cuda", types.ModuleType("flash_attn_2_cuda"))
    try:
        import torchvision.ops  # noqa: F401
    except ImportError:
        class StochasticDepth(torch.nn.Module):
            def __init__(self, p: float, mode: str) -> None:
                super().__init__()
                if p != 0:
                    raise NotImplementedError("the StochasticDepth stand-in is the identity (p=0) only")
                self.p = p

            def forward(self, x):
                return x

        tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.StochasticDepth, tv.ops = StochasticDepth, ops
        sys.modules.update({"torchvision": tv, "torchvision.ops": ops})
    try:
        import triton  # noqa: F401
    except ImportError:
        def apply_rotary(x, cos, sin, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None, interleaved=False,
                         inplace=False, conjugate=False):
            from flash_attn.layers.rotary import apply_rotary_emb_torch

            if cu_seqlens is not None or not isinstance(seqlen_offsets, int) or seqlen_offsets:
                raise NotImplementedError("rotary stand-in: padded batches and offsets are not needed here")
            n = x.shape[1]
            out = apply_rotary_emb_torch(x, cos[:n], -sin[:n] if conjugate else sin[:n], interleaved)
            return x.copy_(out) if inplace else out

        mod = types.ModuleType("flash_attn.ops.triton.rotary")
        mod.apply_rotary = apply_rotary
        sys.modules["flash_attn.ops.triton.rotary"] = mod


_install_stand_ins()

from flash_attn.modules import mha
from flash_perceiver import Perceiver, PerceiverIO

RECORDED: list[torch.Tensor] | None = None


def _weights(q, k, key_padding_mask):
    """flash-attn's torch-path softmax: ``q [B, Q, H, d]``, ``k [B, K, H, d]`` → ``[B, H, Q, K]``."""
    scores = torch.einsum("bthd,bshd->bhts", q, k * (1.0 / q.shape[-1] ** 0.5))
    if key_padding_mask is not None:
        pad = torch.full(key_padding_mask.shape, -10000.0, dtype=scores.dtype).masked_fill(key_padding_mask, 0.0)
        scores = scores + pad[:, None, None, :]
    return torch.softmax(scores, dim=-1)


def _wrap(cls, split):
    original = cls.forward

    def forward(self, *args, key_padding_mask=None, **kwargs):
        if RECORDED is not None:
            q, k = split(*args)
            RECORDED.append(_weights(q, k, key_padding_mask).detach())
        return original(self, *args, key_padding_mask=key_padding_mask, **kwargs)

    cls.forward = forward


_wrap(mha.SelfAttention, lambda qkv: (qkv[:, :, 0], qkv[:, :, 1]))
_wrap(mha.CrossAttention, lambda q, kv: (q, kv[:, :, 0]))

B = 3
SMALL = {"num_latents": 5, "latent_dim": 16, "cross_heads": 2, "cross_head_dim": 8, "latent_heads": 2,
         "latent_head_dim": 8, "use_flash_attn": False}


def _mask(n: int, lengths: list[int]) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


# name -> (class, constructor kwargs, inputs: {data, mask, latents, queries}, forward kwargs, mode)
# mode: "eval", "train" (seeded latent drop) or "grad" (also gradients)
def cases() -> dict:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    x = rnd(B, 7, 6)
    m = _mask(7, [7, 3, 5])
    return {
        "average_gated_mask": (Perceiver, {**SMALL, "input_dim": 6, "depth": 2, "output_dim": 4,
                                           "output_mode": "average"}, {"data": x, "mask": m}, {}, "eval"),
        "concat_plain_mlp_two_self": (Perceiver, {**SMALL, "input_dim": 6, "depth": 2, "output_dim": 3,
                                                  "output_mode": "concat", "gated_mlp": False,
                                                  "self_per_cross_attn": 2}, {"data": x}, {}, "eval"),
        "first_tied_zero_tokens": (Perceiver, {**SMALL, "input_dim": 6, "depth": 3, "output_dim": 4,
                                               "output_mode": "first", "weight_tie_layers": True,
                                               "num_zero_tokens": 2}, {"data": x, "mask": m}, {}, "eval"),
        "list_inputs_weights": (Perceiver, {**SMALL, "input_dim": [6, 3, 9], "depth": 3, "num_zero_tokens": 3},
                                {"data": [x, rnd(B, 4, 3), rnd(B, 10, 9)],
                                 "mask": [m, None, _mask(10, [2, 10, 6])]},
                                {"return_attn_weights": True}, "eval"),
        "latents_2d_no_learned": (Perceiver, {**SMALL, "num_latents": None, "input_dim": 6, "depth": 1,
                                              "output_dim": 4, "output_mode": "average"},
                                  {"data": x, "latents": rnd(4, 16)}, {}, "eval"),
        "latents_3d_embeddings": (Perceiver, {**SMALL, "input_dim": 6, "depth": 2, "output_dim": 4,
                                              "output_mode": "first"},
                                  {"data": x, "mask": m, "latents": rnd(B, 6, 16)},
                                  {"return_embeddings": True}, "eval"),
        "rotary_heads_none_weights": (Perceiver, {**SMALL, "input_dim": 6, "depth": 2, "cross_heads": None,
                                                  "latent_head_dim": None, "latent_heads": 2,
                                                  "latent_rotary_emb_dim": 4, "self_per_cross_attn": 2,
                                                  "output_dim": 2, "output_mode": "average"},
                                      {"data": x, "mask": _mask(7, [7, 0, 2])},  # sample 1: every key masked
                                      {"return_attn_weights": True}, "eval"),
        "latent_drop_train": (Perceiver, {**SMALL, "num_latents": 8, "input_dim": 6, "depth": 2, "output_dim": 4,
                                          "latent_drop": 0.5, "latent_rotary_emb_dim": 8},
                              {"data": x, "mask": m}, {"return_embeddings": True}, "train"),
        "gradients": (Perceiver, {**SMALL, "input_dim": [6, 3], "depth": 2, "output_dim": 4, "num_zero_tokens": 2,
                                  "latent_rotary_emb_dim": 4, "output_mode": "average"},
                      {"data": [x, rnd(B, 4, 3)], "mask": [m, None]}, {}, "grad"),
        # 4500 tokens through one 64-wide cross-attention head: perceivers' chunked oneDNN attention on CPU
        # (3 chunks of keys for 256 latents; sample 1 keeps only the first chunk's keys)
        "long_inputs_grad": (Perceiver, {**SMALL, "num_latents": 256, "input_dim": 6, "depth": 1, "cross_heads": 1,
                                         "cross_head_dim": 64, "output_dim": 4, "output_mode": "average"},
                             {"data": rnd(B, 4500, 6), "mask": _mask(4500, [4500, 1000, 3000])}, {}, "grad"),
        "io_queries_2d_proj": (PerceiverIO, {**SMALL, "input_dim": 6, "query_dim": 10, "depth": 2, "proj_dim": 4,
                                             "query_heads": 2, "query_head_dim": 4},
                               {"data": x, "mask": m, "queries": rnd(6, 10)}, {}, "eval"),
        "io_queries_3d_plain_weights": (PerceiverIO, {**SMALL, "input_dim": [6], "query_dim": 10, "depth": 1,
                                                      "gated_mlp": False, "num_zero_tokens": 1,
                                                      "latent_rotary_emb_dim": 2},
                                        {"data": [x], "mask": [m], "queries": rnd(B, 2, 10)},
                                        {"return_attn_weights": True}, "eval"),
        "io_no_queries_tied": (PerceiverIO, {**SMALL, "input_dim": 6, "query_dim": 10, "depth": 3,
                                             "weight_tie_layers": True}, {"data": x}, {}, "eval"),
        "io_grad": (PerceiverIO, {**SMALL, "input_dim": 6, "query_dim": 10, "depth": 2, "proj_dim": 4,
                                  "num_zero_tokens": 2},
                    {"data": x, "mask": m, "queries": rnd(4, 10)}, {}, "grad"),
    }


def _unrecorded(block: torch.nn.Module) -> None:
    """FlashPerceiver's PerceiverIO returns the encoder's weights only: its query block is not recorded."""
    original = block.forward

    def forward(*args, **kwargs):
        global RECORDED
        saved, RECORDED = RECORDED, None
        try:
            return original(*args, **kwargs)
        finally:
            RECORDED = saved

    block.forward = forward


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm weights around 1), so a tensor loaded to the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = ".norm" in name or name.startswith("out_proj.0") or name.endswith("out_proj.0.weight")
            p.copy_(1.0 + 0.2 * noise if is_norm and name.endswith("weight") else 0.3 * noise)


def utilities() -> dict:
    """ImageAdapter (patches + NeRF / pixels + Gaussian features), encodings, random_mask, meshgrid, schedule."""
    from flash_perceiver import utils
    from flash_perceiver.adapters import ImageAdapter
    from flash_perceiver.utils.encodings import GaussianFourierFeatureTransform, NeRFPositionalEncoding
    from flash_perceiver.utils.training import CosineWithWarmupLR

    g = torch.Generator().manual_seed(1)
    res = {}
    adapters = {
        "patches_nerf": ({"embed_dim": 8, "num_channels": 3, "patch_size": (2, 3)}, ("nerf", 2, {"num_frequency_bands": 4}),
                         torch.randn(2, 3, 4, 6, generator=g)),
        "pixels_gaussian_last": ({"embed_dim": 5, "num_channels": 2, "channel_first": False},
                                 ("gaussian", 2, {"mapping_size": 6, "sigma": 2.0, "seed": 3}),
                                 torch.randn(2, 3, 5, 2, generator=g)),
        "plain": ({"embed_dim": 4, "num_channels": 1}, None, torch.randn(1, 1, 2, 3, generator=g)),
    }
    for i, (name, (kwargs, enc, images)) in enumerate(adapters.items()):
        pos = None
        if enc is not None:
            kind, in_dim, enc_kwargs = enc
            pos = (NeRFPositionalEncoding if kind == "nerf" else GaussianFourierFeatureTransform)(in_dim, **enc_kwargs)
        adapter = ImageAdapter(**kwargs, pos_encoding=pos)
        randomise(adapter, 200 + i)
        res[name] = {"kwargs": kwargs, "enc": enc, "images": images, "state": adapter.state_dict(),
                     "out": adapter(images).detach()}
    coords = torch.rand(4, 3, generator=g) * 2 - 1
    res["gaussian_seeded"] = {"coords": coords, "proj": GaussianFourierFeatureTransform(3, 5, 1.5, seed=11).proj_matrix,
                              "out": GaussianFourierFeatureTransform(3, 5, 1.5, seed=11)(coords)}
    res["nerf"] = {"coords": coords, "out": NeRFPositionalEncoding(3, 5)(coords)}
    torch.manual_seed(3)
    res["random_mask"] = utils.random_mask(torch.zeros(6, 9))
    res["meshgrid"] = utils.meshgrid(3, 4, batch_size=2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    schedule, lrs = CosineWithWarmupLR(opt, training_steps=10, warmup_steps=3), []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    res["lrs"] = lrs
    return res


def _flat(out):
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _flat(o)]


def main(out: Path) -> None:
    global RECORDED
    for i, (name, (cls, kwargs, inputs, fwd, mode)) in enumerate(cases().items()):
        torch.manual_seed(i)
        model = cls(**kwargs)
        randomise(model, 100 + i)
        model.train(mode == "train")
        if isinstance(model, PerceiverIO):
            _unrecorded(model.query_block)
        res = {"cls": cls.__name__, "kwargs": kwargs, "state": model.state_dict(), "inputs": inputs, "fwd": fwd,
               "mode": mode, "keys": list(model.state_dict().keys()), "seed": 1000 + i}
        call = {k: v for k, v in inputs.items()}
        if mode == "grad":
            call["data"] = [d.clone().requires_grad_() for d in call["data"]] if isinstance(call["data"], list) \
                else call["data"].clone().requires_grad_()
        ref_fwd = {k: v for k, v in fwd.items() if k != "return_attn_weights"}
        RECORDED = [] if fwd.get("return_attn_weights") else None
        torch.manual_seed(res["seed"])  # latent drop draws from the global generator
        with torch.set_grad_enabled(mode == "grad"):
            result = model(**call, **ref_fwd)
        res["out"] = result.detach()
        if RECORDED is not None:
            res["weights"] = RECORDED
            RECORDED = None
        if mode == "grad":
            cot = torch.randn(result.shape, generator=torch.Generator().manual_seed(7))
            (result * cot).sum().backward()
            res["cotangent"] = cot
            res["grads"] = {k: p.grad for k, p in model.state_dict(keep_vars=True).items()}
            res["input_grads"] = [d.grad for d in _flat(call["data"])]
        torch.save(res, out / f"{name}.pt")
    torch.save(utilities(), out / "utilities.pt")
    print("DONE")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
