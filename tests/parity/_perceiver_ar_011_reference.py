"""Run by test_perceiver_ar.py in a subprocess: krasserm's perceiver-io 0.11.0 ``CausalSequenceModel`` (the
backend of its ``CausalLanguageModel``) with left padding and its KV cache. Builds a tiny seeded model with
every parameter randomised and saves to the folder given as the first argument (``v011.pt``):

- eval and training (prefix dropout) forwards of a left-padded batch, and the unpadded eval forward;
- greedy generation of a left-padded batch on *our* schedule (latents = the last ``max_latents``
  positions, window = the last ``max_seq_len``), uncached, with each step's logits;
- its KV cache in the all-latent phase (``prefix_len=0``): per-step logits of a short prompt;
- its HF ``generate`` schedule (``prefix_len`` grows once the latents reach ``max_latents``; caches
  truncated as ``PerceiverCausalSequenceModel.prepare_inputs_for_generation`` does), cached and
  uncached, fed the same tokens: how far its cache moves the logits.

Only the backend modules are imported (no transformers, no Lightning); fairscale, imported at module
level and called only with activation checkpointing, is replaced by a stand-in when missing.
"""

import sys
from pathlib import Path

import torch
from _krasserm_env import use_krasserm

use_krasserm("0.11.0")
from perceiver.model.core.config import CausalSequenceModelConfig
from perceiver.model.core.modules import CausalSequenceModel

FIELDS = {"vocab_size": 50, "max_seq_len": 24, "max_latents": 8, "num_channels": 32, "num_heads": 4,
          "num_self_attention_layers": 2, "self_attention_widening_factor": 2, "cross_attention_widening_factor": 2,
          "cross_attention_dropout": 0.25, "output_bias": False, "output_norm": False, "abs_pos_emb": True}
OPTIONS = [{"num_self_attention_rotary_layers": -1},
           {"num_self_attention_rotary_layers": 2, "cross_attention_widening_factor": 1,
            "self_attention_widening_factor": 3}]
PADS = [0, 3, 7]  # per row; at most prefix_len = 20 - 8 = 12, so padding never reaches the latents


def randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if p.ndim == 1 and name.endswith("weight") else 0.15 * noise)


def window_logits(model, ids, pad, max_latents, max_seq_len):
    ids, pad = ids[:, -max_seq_len:], pad[:, -max_seq_len:]
    prefix_len = max(0, ids.shape[1] - max_latents)
    return model(ids, prefix_len=prefix_len, pad_mask=pad).logits[:, -1]


def hf_schedule(model, prompt, tokens, cached):
    """Logits of each step of krasserm's HF generate (num_latents=1) for the given continuation ``tokens``."""
    msl, ml = model.max_seq_len, model.max_latents
    prefix_len, seq, past, out = prompt.shape[1] - 1, prompt, None, []
    for t in range(tokens.shape[1] + 1):
        input_len = seq.shape[1]
        exceeded = input_len - prefix_len > ml
        if exceeded and prefix_len < model.max_prefix_len:
            prefix_len += 1
        if not cached:
            logits = model(seq[:, -msl:], prefix_len=prefix_len).logits
        else:
            if past is not None:
                ca, *sa = past
                if exceeded:
                    sa = [(k[:, -(ml - 1):], v[:, -(ml - 1):]) for k, v in sa]
                if input_len > msl:
                    ca = (ca[0][:, -(msl - 1):], ca[1][:, -(msl - 1):])
                past = [ca, *sa]
            x = seq[:, -msl:] if past is None else seq[:, -1:]
            output = model(x, prefix_len=prefix_len, kv_cache=[] if past is None else past)
            logits, past = output.logits, output.kv_cache
        out.append(logits[:, -1])
        if t < tokens.shape[1]:
            seq = torch.cat((seq, tokens[:, t : t + 1]), dim=1)
    return torch.stack(out, dim=1)


def main(out: Path) -> None:
    torch.manual_seed(0)
    config = CausalSequenceModelConfig(**FIELDS)
    model = CausalSequenceModel(config)
    randomise(model, 100)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, FIELDS["vocab_size"], (3, 20), generator=g)
    pad = torch.stack([torch.arange(20) < p for p in PADS])
    res = {"fields": FIELDS, "state": model.state_dict(), "ids": ids, "pad_mask": pad}
    model.eval()
    with torch.no_grad():
        res["eval"] = model(ids, prefix_len=12, pad_mask=pad).logits
        res["eval_unpadded"] = model(ids, prefix_len=12).logits
        model.train()
        torch.manual_seed(1000)
        res["train"] = model(ids, prefix_len=12, pad_mask=pad).logits
        model.eval()

        # greedy generation on our schedule, left-padded prompts of lengths 14 and 10
        prompts = torch.randint(0, FIELDS["vocab_size"], (2, 14), generator=g)
        prompt_pad = torch.stack([torch.arange(14) < p for p in (0, 4)])
        seq, seq_pad, steps = prompts, prompt_pad, []
        for _ in range(16):  # 14 + 16 = 30 > max_seq_len: the window slides
            logits = window_logits(model, seq, seq_pad, FIELDS["max_latents"], FIELDS["max_seq_len"])
            steps.append(logits)
            seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
            seq_pad = torch.nn.functional.pad(seq_pad, (0, 1), value=False)
        res["generate"] = {"prompt": prompts, "pad_mask": prompt_pad, "tokens": seq[:, 14:],
                           "logits": torch.stack(steps, dim=1)}

        # its KV cache in the all-latent phase: prompt of 3, 5 more tokens (8 = max_latents)
        short = ids[:2, :3]
        seq, past, steps = short, [], []
        for _ in range(6):
            output = model(seq if not past else seq[:, -1:], prefix_len=0, kv_cache=past)
            past = output.kv_cache
            steps.append(output.logits[:, -1])
            seq = torch.cat((seq, output.logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        res["cache_all_latents"] = {"prompt": short, "tokens": seq[:, 3:], "logits": torch.stack(steps, dim=1)}

        # its HF generate schedule, cached vs uncached, on the same continuation
        prompt = ids[:2, :5]
        tokens = torch.randint(0, FIELDS["vocab_size"], (2, 25), generator=g)
        res["hf_schedule"] = {"prompt": prompt, "tokens": tokens,
                              "uncached": hf_schedule(model, prompt, tokens, cached=False),
                              "cached": hf_schedule(model, prompt, tokens, cached=True)}

    # the options a state dict does not record: every self-attention layer rotating (-1) or the first two,
    # and cross- and self-attention MLPs of different widths
    res["options"] = {}
    for i, extra in enumerate(OPTIONS):
        fields = {**FIELDS, "num_self_attention_layers": 3, **extra}
        torch.manual_seed(10 + i)
        other = CausalSequenceModel(CausalSequenceModelConfig(**fields))
        randomise(other, 200 + i)
        other.eval()
        with torch.no_grad():
            res["options"][i] = {"fields": fields, "state": other.state_dict(),
                                 "eval": other(ids, prefix_len=12).logits}
    torch.save(res, out / "v011.pt")
    print("DONE")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
