"""Fully sharded data parallel training (PyTorch FSDP2, ``fully_shard``) as a Lightning strategy.

Lightning's own ``FSDPStrategy`` (FSDP1) refuses to run without a GPU, and its ``ModelParallelStrategy``
(FSDP2) leaves the sharding to a ``configure_model`` hook that every LightningModule would have to write.
:class:`FSDP2Strategy` is ``ModelParallelStrategy`` with the sharding done for any model: it runs on CPU
(gloo) and CUDA (NCCL), under ``torchrun`` or with processes Lightning starts itself, and is registered as
``"fsdp2"`` (the ``perceivers`` CLI also reads ``--trainer.strategy fsdp`` as this strategy)::

    torchrun --standalone --nproc_per_node 2 $(which perceivers) fit --config digits --trainer.strategy fsdp

What it does to the model, once, before the optimizer is built (``setup``):

1. every *outermost* module whose class name is in ``block_types`` (the attention blocks of
   :mod:`perceivers.layers` and :class:`~perceivers.PerceiverBlock` by default) becomes its own FSDP unit
   (``fully_shard``): its parameters are stored as ``1/N`` shards and gathered whole only while it runs;
2. the block methods that models call from outside ``forward`` (``prepare_context``, ``project_kv``,
   ``prepare``: tied cross-attends project their context once) gather the parameters too;
3. each child of the LightningModule that holds parameters (``task.model``) becomes a root unit holding
   what is left (embeddings, latents, heads).

Parameter names do not change. Gradients are reduce-scattered (averaged over processes, as DDP does), so
a run on N processes trains the same weights as one process with the same global batch.

Checkpoints are full, consolidated state dicts: the parameters and the optimizer state are gathered onto
rank 0 (in CPU memory) and written by the trainer's ``CheckpointIO`` (atomically under the ``perceivers``
CLI). The file has exactly the layout of a
single-process checkpoint, optimizer state keyed by position in the parameter groups included, so
``perceivers predict``, ``Task.load_from_checkpoint``, ``perceivers.load_checkpoint`` and ``--resume``
under DDP or one process read it, and a run resumed under FSDP gets its shards back from it.

Precision: ``32-true``, ``bf16-mixed`` (autocast; float32 weights, gradients and their reduction) and
``bf16-true`` (the model is cast to bfloat16 before sharding: bfloat16 shards, gradients, reductions and
optimizer state). Others are refused before the first step (``16-mixed`` would need a gradient scaler for
sharded gradients).

Tested on CPU with gloo (2 processes on one machine, and 2 single-process "nodes"); the CUDA/NCCL path uses
the same calls (Lightning's process-group set-up with ``device_id``, a CUDA device mesh) but was not run
where this was written (no GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.model_parallel import _has_dtensor_modules, _is_sharded_checkpoint
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from .tasks import ConfigError

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["DEFAULT_BLOCK_TYPES", "DEFAULT_FORWARD_METHODS", "FSDP2Strategy", "gathered_parameters",
           "is_sharded", "shard_module"]

DEFAULT_BLOCK_TYPES: tuple[str, ...] = ("PerceiverBlock", "CrossAttentionBlock", "SelfAttentionBlock")
DEFAULT_FORWARD_METHODS: tuple[str, ...] = ("prepare_context", "project_kv", "prepare")
SUPPORTED_PRECISION = ("32-true", "bf16-mixed", "bf16-true")


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (sharded by FSDP2 or another DTensor parallelism)."""
    return _has_dtensor_modules(module)


def gathered_parameters(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every parameter; sharded ones are all-gathered (a collective: every
    process must iterate the same parameters in the same order)."""
    from torch.distributed.tensor import DTensor

    for name, param in module.named_parameters():
        yield name, param.full_tensor() if isinstance(param, DTensor) else param


def _outermost(module: nn.Module, block_types: tuple[str, ...]) -> list[nn.Module]:
    found: list[nn.Module] = []

    def visit(parent: nn.Module) -> None:
        for child in parent.children():
            if type(child).__name__ in block_types:
                found.append(child)
            else:
                visit(child)

    visit(module)
    return list({id(m): m for m in found}.values())  # a module registered twice is sharded once


def _register_forward_method(module: nn.Module, name: str) -> None:
    """Make ``module.<name>()`` gather the parameters when called from outside ``module.forward``.

    ``register_fsdp_forward_method`` runs FSDP's pre-/post-forward hooks around the method (gather, and
    in the backward pass reduce the gradients of what the method computed). Called from inside the
    module's own forward (``CrossAttentionBlock.forward`` calls ``self.prepare``) those hooks would free
    the parameters half-way, so there the method runs plainly: the enclosing call's hooks cover it.
    """
    from torch.distributed.fsdp import register_fsdp_forward_method
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    plain = getattr(module, name)
    register_fsdp_forward_method(module, name)
    hooked = getattr(module, name)
    state = module._get_fsdp_state()

    @functools.wraps(plain)
    def method(*args: Any, **kwargs: Any) -> Any:
        inside_forward = getattr(state, "_training_state", None) == TrainingState.FORWARD
        return (plain if inside_forward else hooked)(*args, **kwargs)

    setattr(module, name, method)


def shard_module(
    module: nn.Module,
    mesh: Any,
    *,
    block_types: Iterable[str] = DEFAULT_BLOCK_TYPES,
    forward_methods: Iterable[str] = DEFAULT_FORWARD_METHODS,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> list[str]:
    """Apply ``fully_shard`` to the outermost ``block_types`` modules inside ``module``, then to each child
    of ``module`` that holds parameters (see the module docstring). Returns the sharded blocks' names.

    ``module`` itself (a LightningModule) is not sharded and must hold no parameters of its own.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    direct = [name for name, _ in module.named_parameters(recurse=False)]
    if direct:
        raise ConfigError(f"FSDP2Strategy shards the children of {type(module).__name__}; move its own parameters "
                         f"{direct} into a submodule")
    kwargs: dict[str, Any] = {"mesh": mesh}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    block_types = tuple(block_types)
    blocks = _outermost(module, block_types)
    names = {id(m): n for n, m in module.named_modules()}
    for block in blocks:
        if isinstance(block, FSDPModule):  # sharded already (by a configure_model hook)
            continue
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
        for name in forward_methods:
            if callable(getattr(type(block), name, None)):
                _register_forward_method(block, name)
    for child in module.children():
        if isinstance(child, FSDPModule) or next(child.parameters(), None) is None:
            continue
        fully_shard(child, reshard_after_forward=None, **kwargs)  # None: roots keep parameters for the backward
    if not blocks:
        rank_zero_warn(f"FSDP2Strategy: no modules of the block types {list(block_types)} in "
                       f"{type(module).__name__}; each child holding parameters is one unit, gathered whole in every "
                       "forward (set strategy block_types to the model's layer classes)")
    return [names[id(b)] for b in blocks]


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over all processes, applied to any LightningModule.

    Args:
        block_types: class names of the modules that become FSDP units (outermost matches only).
        forward_methods: block methods that models call outside ``forward``; they gather parameters too.
        reshard_after_forward: free gathered block parameters after each forward (``True``, least memory)
            or keep them until the backward pass (``False``, less communication). Root units keep theirs.
        cpu_offload: keep parameter shards, gradients and optimizer state in CPU memory (CUDA only).
        process_group_backend: default ``gloo`` on CPU, ``nccl`` on CUDA.
        timeout: for collectives.
    """

    strategy_name = "fsdp2"

    def __init__(
        self,
        block_types: list[str] | tuple[str, ...] = DEFAULT_BLOCK_TYPES,
        forward_methods: list[str] | tuple[str, ...] = DEFAULT_FORWARD_METHODS,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(save_distributed_checkpoint=False, process_group_backend=process_group_backend,
                         timeout=timeout)
        self.block_types = tuple(block_types)
        self.forward_methods = tuple(forward_methods)
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.sharded_blocks: list[str] = []

    # ------------------------------------------------------------------ processes and mesh
    def setup_environment(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self._setup_distributed()  # process group (gloo / nccl), ranks, seeds
        self._data_parallel_size, self._tensor_parallel_size = self.world_size, 1
        self._device_mesh = init_device_mesh(self.root_device.type, (self.world_size,),
                                             mesh_dim_names=("data_parallel",))
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    # ------------------------------------------------------------------ sharding
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        precision = getattr(self.precision_plugin, "precision", "32-true")
        if precision not in SUPPORTED_PRECISION:
            raise ConfigError(f"FSDP2Strategy runs with precision 32-true, bf16-mixed (autocast, float32 weights and "
                             f"gradients) or bf16-true (bfloat16 weights, gradients and optimizer state); got "
                             f"{precision!r}")
        if self.cpu_offload and self.root_device.type == "cpu":
            raise ConfigError("FSDP2Strategy(cpu_offload=True) offloads from GPUs; the model is already on the CPU")
        if not is_sharded(self.model):  # first set-up of this module (a later validate/test reuses the shards)
            self._check_compile(self.model)
            self.model = self.precision_plugin.convert_module(self.model)
            self.sharded_blocks = shard_module(
                self.model, self.device_mesh, block_types=self.block_types, forward_methods=self.forward_methods,
                reshard_after_forward=self.reshard_after_forward, cpu_offload=self.cpu_offload)
            _materialize_distributed_module(self.model, self.root_device)
            roots = [n for n, c in self.model.named_children() if next(c.parameters(), None) is not None]
            rank_zero_info(f"FSDP2Strategy: {self.world_size} process(es) on {self.root_device.type}, "
                           f"{len(self.sharded_blocks)} sharded blocks ({', '.join(self.sharded_blocks) or 'none'}) "
                           f"+ root unit(s) {', '.join(roots)}")
        if not self.cpu_offload:
            self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING and not self.cpu_offload:
            _optimizers_to_device(self.optimizers, self.root_device)

    @staticmethod
    def _check_compile(module: nn.Module) -> None:
        compiled = [n for n, m in module.named_modules() if getattr(m, "_compiled_call_impl", None) is not None
                    or type(m).__name__ == "OptimizedModule"]
        if compiled:
            raise ConfigError(f"FSDP2Strategy: the model was compiled before sharding ({compiled[0] or 'the root'}); "
                             "train uncompiled under FSDP (model.init_args.compile false)")

    # ------------------------------------------------------------------ checkpoints: one full file
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The full optimizer state on rank 0 (empty elsewhere) in ``Optimizer.state_dict()`` layout: state
        keyed by each parameter's position in the parameter groups, exactly as an unsharded run saves it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.model is not None
        full = get_optimizer_state_dict(self.model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not full:
            return {}
        index = {name: i for i, name in enumerate(self._names_in_group_order(optimizer))}
        groups = [{**group, "params": [index[name] for name in group["params"]]} for group in full["param_groups"]]
        return {"state": {index[name]: value for name, value in full["state"].items()}, "param_groups": groups}

    def _names_in_group_order(self, optimizer: Optimizer) -> list[str]:
        assert self.model is not None
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a full checkpoint file (from any strategy) into the shards: every process reads the file
        and keeps its part. A folder of shards (Lightning's distributed checkpoint) goes to Lightning's loader."""
        path = Path(self.broadcast(checkpoint_path))
        if _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        assert self.model is not None and self.lightning_module is not None
        checkpoint = self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
        strict = self.lightning_module.strict_loading
        set_model_state_dict(self.model, checkpoint["state_dict"],
                             options=StateDictOptions(full_state_dict=True, strict=strict))
        saved = checkpoint.get("optimizer_states") or []
        if self.optimizers and saved:
            if len(saved) != len(self.optimizers):
                raise ValueError(f"the checkpoint holds {len(saved)} optimizer states, the task has "
                                 f"{len(self.optimizers)} optimizers")
            for optimizer, state in zip(self.optimizers, saved):
                set_optimizer_state_dict(self.model, optimizer, self._state_by_name(optimizer, state),
                                         options=StateDictOptions(full_state_dict=True, strict=strict))
        return checkpoint

    def _state_by_name(self, optimizer: Optimizer, state: Mapping[str, Any]) -> dict[str, Any]:
        """An ``Optimizer.state_dict()`` (positions) → the name-keyed form ``set_optimizer_state_dict`` takes."""
        groups = state["param_groups"]
        if all(isinstance(p, str) for g in groups for p in g["params"]):
            return dict(state)  # already by name
        names = self._names_in_group_order(optimizer)
        saved = [p for g in groups for p in g["params"]]
        if len(saved) != len(names) or [len(g["params"]) for g in groups] != [
                len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError("the checkpoint's optimizer parameter groups do not match the task's "
                             f"({[len(g['params']) for g in groups]} vs {[len(g['params']) for g in optimizer.param_groups]} "
                             "parameters per group)")
        by_position = dict(zip(saved, names))
        return {"state": {by_position[k]: v for k, v in state["state"].items()},
                "param_groups": [{**g, "params": [by_position[p] for p in g["params"]]} for g in groups]}


def register(registry: Any = StrategyRegistry) -> None:
    """Register ``"fsdp2"`` with Lightning's strategy registry (idempotent)."""
    if FSDP2Strategy.strategy_name not in registry:
        registry.register(FSDP2Strategy.strategy_name, FSDP2Strategy,
                          description="FSDP2 (fully_shard) per attention block, CPU or CUDA (perceivers)")


register()
