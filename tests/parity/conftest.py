"""Helpers for parity tests against perceiver-pytorch: load the same weights, compare outputs and gradients.

The ``parity`` fixture runs a reference model and a perceivers model on the same inputs, checks that
the outputs agree, backpropagates the same random cotangent through both and checks every
parameter's gradient (mapped through :func:`perceivers.convert.from_lucidrains`, so a fused ``to_kv``
gradient is compared with ``cat(to_k, to_v)`` and a tied layer's gradient with perceivers' single
unique block) and every input's gradient. The largest differences are printed at the end of the run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from perceivers.convert import from_lucidrains

# float32, as the parity spec requires: |diff| <= TOL * max(1, max|reference|) per tensor, absolute for values
# up to 1. Beyond that float32 itself is the limit: on the lucidrains Perceiver's hidden states (|h| ~ 13)
# both implementations are ~6e-6 from float64, so two exact implementations differ by up to ~2e-5.
OUT_RTOL = 1e-5  # outputs
GRAD_RTOL = 1e-5  # parameter and input gradients

_MAX_ERRORS: dict[str, dict[str, float]] = defaultdict(
    lambda: {"output": 0.0, "grad": 0.0, "input_grad": 0.0}
)


def convert_block(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A ``perceiver_pytorch.PerceiverBlock`` state dict → perceivers ``PerceiverBlock`` keys.

    The block is converted as layer 0 of a one-layer ``Perceiver`` through the public converter.
    """
    wrapped = {"latents": torch.zeros(1, 1), **{f"layers.0.{k}": v for k, v in state_dict.items()}}
    out = from_lucidrains(wrapped)
    out.pop("latents")
    return {k.removeprefix("blocks.0."): v for k, v in out.items()}


def _flatten(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    flat: list[Tensor] = []
    for item in out:
        flat.extend(_flatten(item))
    return flat


def _grads_by_key(model: nn.Module) -> dict[str, Tensor]:
    """Every state-dict key → its parameter's gradient (zeros where none); tied keys share one tensor."""
    by_param: dict[int, Tensor] = {}
    grads = {}
    for key, p in model.state_dict(keep_vars=True).items():
        if id(p) not in by_param:
            by_param[id(p)] = p.grad.detach() if p.grad is not None else torch.zeros_like(p.detach())
        grads[key] = by_param[id(p)]
    return grads


@dataclass
class ParityResult:
    output: float
    grad: float
    input_grad: float
    worst_grad_key: str


class Parity:
    """See the module docstring. ``family`` labels the errors in the end-of-run summary."""

    convert_block = staticmethod(convert_block)

    def __call__(
        self,
        family: str,
        reference: nn.Module,
        ours: nn.Module,
        run: Callable[..., object],
        inputs: Mapping[str, Tensor | None],
        *,
        convert: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] = from_lucidrains,
        train: bool = False,
        seed: int = 0,
        randomize: Callable[[nn.Module, int], nn.Module] | None = None,
    ) -> ParityResult:
        if randomize is not None:
            randomize(reference, seed)
        ours.load_state_dict(convert(reference.state_dict()), strict=True)
        reference.train(train)
        ours.train(train)

        outs, input_grads = [], []
        for model in (reference, ours):
            leaves = {
                k: (
                    v.detach().clone().requires_grad_()
                    if isinstance(v, Tensor) and v.is_floating_point()
                    else v
                )
                for k, v in inputs.items()
            }
            torch.manual_seed(seed)  # identical random streams (sequence dropout in training)
            flat = _flatten(run(model, **leaves))
            gen = torch.Generator().manual_seed(seed + 1)
            loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in flat)
            loss.backward()
            outs.append([o.detach() for o in flat])
            input_grads.append(
                {k: v.grad for k, v in leaves.items() if isinstance(v, Tensor) and v.grad is not None}
            )

        ref_out, our_out = outs
        assert len(ref_out) == len(our_out), f"{len(ref_out)} reference outputs, {len(our_out)} ours"
        out_err = 0.0
        for i, (r, o) in enumerate(zip(ref_out, our_out)):
            assert r.shape == o.shape, f"output {i}: reference shape {tuple(r.shape)}, ours {tuple(o.shape)}"
            out_err = max(out_err, (r - o).abs().max().item() / max(1.0, r.abs().max().item()))
        assert out_err <= OUT_RTOL, f"max (relative) output difference {out_err:.3g} > {OUT_RTOL}"

        ref_grads = convert(_grads_by_key(reference))
        our_grads = {
            k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in ours.named_parameters()
        }
        assert ref_grads.keys() == our_grads.keys(), (
            f"gradient keys differ: only reference {sorted(ref_grads.keys() - our_grads.keys())}, "
            f"only ours {sorted(our_grads.keys() - ref_grads.keys())}"
        )
        grad_err, worst = 0.0, ""
        for key, g in our_grads.items():
            r = ref_grads[key]
            err = (r - g).abs().max().item() / max(1.0, r.abs().max().item())
            if err > grad_err:
                grad_err, worst = err, key
        assert grad_err <= GRAD_RTOL, (
            f"max (relative) gradient difference {grad_err:.3g} at {worst} > {GRAD_RTOL}"
        )

        in_err = 0.0
        assert input_grads[0].keys() == input_grads[1].keys()
        for key, r in input_grads[0].items():
            g = input_grads[1][key]
            assert g.shape == r.shape, f"input gradient {key}: shape {tuple(g.shape)}, reference {tuple(r.shape)}"
            if r.numel() == 0:  # e.g. positions-only inputs with 0 channels
                continue
            in_err = max(in_err, (r - g).abs().max().item() / max(1.0, r.abs().max().item()))
        assert in_err <= GRAD_RTOL, f"max (relative) input-gradient difference {in_err:.3g} > {GRAD_RTOL}"

        max_out = max(r.abs().max().item() for r in ref_out)
        print(
            f"parity {family}: output {out_err:.2e} (|out| <= {max_out:.2g}), "
            f"grad {grad_err:.2e} at {worst}, input grad {in_err:.2e}"
        )
        record = _MAX_ERRORS[family]
        record["output"] = max(record["output"], out_err)
        record["grad"] = max(record["grad"], grad_err)
        record["input_grad"] = max(record["input_grad"], in_err)
        return ParityResult(out_err, grad_err, in_err, worst)


@pytest.fixture
def parity() -> Parity:
    return Parity()


def pytest_terminal_summary(terminalreporter) -> None:
    if not _MAX_ERRORS:
        return
    terminalreporter.section("perceiver-pytorch parity: largest differences (float32)")
    for family, errs in sorted(_MAX_ERRORS.items()):
        terminalreporter.write_line(
            f"{family:16s} output {errs['output']:.2e}   param grad (rel) {errs['grad']:.2e}   "
            f"input grad (rel) {errs['input_grad']:.2e}"
        )
