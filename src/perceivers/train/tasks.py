"""LightningModules for the training tasks: classification (images or sequences) and byte-level masked LM.

A task wraps any ``nn.Module`` of this library — given as a ``class_path`` in YAML, or by registered
name through :func:`perceivers.create_model` (``model_name`` + ``model_kwargs``) — and adds the loss,
torchmetrics metrics, the optimizer with parameter groups, the learning-rate schedule, and optional
``torch.compile`` / activation checkpointing. Batches are dicts: ``inputs``, ``target`` or ``labels``,
and an optional boolean ``mask`` (True = real token).

Models are called as they are written: an argument named ``pixel_values`` gets channels-first images
(the official classifiers), anything else channels-last ``[B, H, W, C]``; a mask goes to
``attention_mask`` or ``mask``, whichever the forward takes; outputs may be a tensor or have ``.logits``.

Precision: floating-point inputs are cast to the model's parameter dtype when it is called (so
``bf16-true`` / ``16-true`` / ``64-true`` models get ``bfloat16`` / ``float16`` / ``float64`` images and
feature sequences; token ids, masks and labels are never cast), while losses are computed from float32
logits and every torchmetrics state stays float32.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import kernels
from ..data.transforms import mix_batch
from .data import EvalShardSampler

__all__ = ["ClassificationTask", "ConfigError", "MaskedLMTask", "Task", "build_model", "model_logits"]


class ConfigError(ValueError):
    """A configuration that cannot train: raised before the first training step, with what to change."""


def _configured(role: str, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)``, its refusal of a setting (``lr=-1``) as a :class:`ConfigError` naming ``role``."""
    try:
        return factory(*args, **kwargs)
    except (TypeError, ValueError) as err:
        target, bound = _factory_target(factory)
        name = getattr(target, "__name__", repr(target))
        settings = ", ".join(f"{k}={v!r}" for k, v in bound.items())
        raise ConfigError(f"{role} {name}({settings}): {err}") from err


def build_model(model: nn.Module | None, model_name: str | None, model_kwargs: dict[str, Any] | None) -> nn.Module:
    """The module itself, or ``perceivers.create_model(model_name, **model_kwargs)``; exactly one of the two."""
    if (model is None) == (model_name is None):
        raise ConfigError(
            "give exactly one of `model` (a class_path, e.g. perceivers.Perceiver) or `model_name` (a registered "
            f"name for perceivers.create_model); got model={type(model).__name__ if model is not None else None}, "
            f"model_name={model_name!r}"
        )
    if model is not None:
        if model_kwargs:
            raise ConfigError("model_kwargs apply only with model_name; put the arguments in model.init_args")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        return model
    try:
        from ..tasks import create_model, list_models
    except ImportError as err:  # pragma: no cover - depends on the installed package
        raise ConfigError(f"model_name needs perceivers.create_model, which failed to import: {err}") from err
    names = list_models()
    if model_name not in names:
        raise ConfigError(f"unknown model name {model_name!r}; registered models: {', '.join(names)}")
    try:
        return create_model(model_name, **(model_kwargs or {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"create_model({model_name!r}, **{model_kwargs}) failed: {err}") from err


def model_logits(output: Any) -> Tensor:
    """A model's logits: the tensor itself, ``output.logits`` or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _forward_parameters(model: nn.Module) -> list[str]:
    target = getattr(model, "_orig_mod", model)
    return list(inspect.signature(target.forward).parameters)


def _factory_target(factory: Callable) -> tuple[Callable, dict[str, Any]]:
    """The class a (jsonargparse) factory builds and its bound keyword arguments.

    jsonargparse gives ``partial(instantiator, cls, **init_args)``; a plain class is its own target.
    """
    if isinstance(factory, functools.partial):
        bound = dict(factory.keywords or {})
        for arg in factory.args:
            if inspect.isclass(arg):
                return arg, bound
        inner, more = _factory_target(factory.func)
        return inner, {**more, **bound}
    return factory, {}


def fused_optimizer_kwargs(factory: Callable, params: list[Tensor]) -> dict[str, Any]:
    """``{"fused": True}`` when the optimizer has a fused kernel that every parameter can use.

    PyTorch's fused Adam/AdamW/SGD/Adagrad update all tensors in one pass per parameter instead of
    one pass per arithmetic operation (AdamW on the 201M-parameter language model: 95 ms against
    394 ms per step on 2 CPU cores). Left alone when the configuration chose ``fused`` or ``foreach``
    itself, or when a parameter is not floating point or lives on a device without fused kernels.
    """
    target, bound = _factory_target(factory)
    try:
        accepted = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    if "fused" not in accepted or bound.get("fused") is not None or bound.get("foreach") is not None:
        return {}
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    if not params or not all(p.is_floating_point() and p.device.type in devices for p in params):
        return {}
    return {"fused": True}


# Attributes that fix a schedule's length. Resuming restores them from the checkpoint's scheduler state, which
# silently replaces this run's value (OneCycleLR then fails once it steps past its old length).
SCHEDULE_LENGTH_ATTRIBUTES: tuple[str, ...] = ("total_steps", "T_max", "total_iters")


def schedule_length(state: dict[str, Any]) -> tuple[str, int] | None:
    """``(attribute, length)`` of a scheduler's ``__dict__`` or ``state_dict()`` planned for a fixed number of
    steps (``total_steps``: OneCycleLR, FlatCosine, WarmupCosine; ``T_max``; ``total_iters``), else ``None``."""
    for name in SCHEDULE_LENGTH_ATTRIBUTES:
        value = state.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return name, value
    return None


@contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside, ``torch.get_default_dtype()`` is ``dtype`` (``None``: unchanged); restored on exit."""
    saved = torch.get_default_dtype()
    if dtype is None or dtype == saved or not dtype.is_floating_point:
        yield
        return
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _float32_floats(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


BLOCK_TYPES: tuple[str, ...] = ("CrossAttentionBlock", "SelfAttentionBlock", "PerceiverBlock")


def enable_activation_checkpointing(model: nn.Module, block_types: tuple[str, ...] = BLOCK_TYPES) -> int:
    """Recompute the activations of every attention block in the backward pass instead of storing them.

    Wraps the ``forward`` of each module whose class name is in ``block_types`` (outermost only) with
    non-reentrant :func:`torch.utils.checkpoint.checkpoint`; parameter names and the state dict do not
    change. Returns the number of wrapped modules.
    """
    wrapped = 0

    def visit(module: nn.Module) -> None:
        nonlocal wrapped
        for child in module.children():
            if type(child).__name__ in block_types and not getattr(child, "_perceivers_checkpointed", False):
                inner = child.forward

                def forward(*args: Any, _inner: Callable = inner, **kwargs: Any) -> Any:
                    if torch.is_grad_enabled():
                        return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                    return _inner(*args, **kwargs)

                child.forward = forward
                child._perceivers_checkpointed = True
                wrapped += 1
            else:
                visit(child)

    visit(model)
    return wrapped


class Task(pl.LightningModule):
    """What every task shares: the model, optimizer, schedule, compile and activation checkpointing.

    Args:
        model: the network (a ``class_path`` in YAML).
        model_name, model_kwargs: instead of ``model``, a registered name for :func:`perceivers.create_model`.
        optimizer: optimizer class and its arguments (``class_path`` + ``init_args``); called with
            parameter groups.
        lr_scheduler: optional schedule; ``ReduceLROnPlateau`` steps per epoch on ``monitor``, other
            schedules per ``lr_interval``. Schedules with a ``total_steps`` argument get the run's optimizer
            step count when it is not given.
        lr_interval: ``"step"`` or ``"epoch"``.
        monitor: metric for ``ReduceLROnPlateau``.
        weight_decay_exclude_1d: no weight decay for biases, norm scales and other 1-D parameters.
        scale_lr_with_batch: if set, every learning rate is multiplied by ``global batch / this`` (the
            DeepMind rule ``lr = base × batch / 256``).
        compile: ``torch.compile`` the model in place (state-dict keys unchanged).
        activation_checkpointing: recompute attention-block activations in the backward pass.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        model_name: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_interval: Literal["step", "epoch"] = "step",
        monitor: str = "val/loss",
        weight_decay_exclude_1d: bool = True,
        scale_lr_with_batch: int | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        # Under the CLI the parsed config (the model as class_path + init_args) is saved, so
        # Task.load_from_checkpoint rebuilds everything; a module object given in Python is not saved.
        self.save_hyperparameters(ignore=[] if _given_hyperparameters.get() is not None else ["model"])
        self.model = build_model(model, model_name, model_kwargs)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.lr_interval = lr_interval
        self.monitor = monitor
        self.weight_decay_exclude_1d = weight_decay_exclude_1d
        self.scale_lr_with_batch = scale_lr_with_batch
        self.compile_model = compile
        self.activation_checkpointing = activation_checkpointing
        self._forward_params = _forward_parameters(self.model)
        self._prepared = False
        # resume check: this run's schedule (class name, length) and the lengths in the checkpoint being restored
        self._planned_schedule: tuple[str, tuple[str, int] | None] | None = None
        self._checkpoint_schedules: list[tuple[str, int] | None] | None = None

    # ------------------------------------------------------------------ model call
    def model_dtype(self) -> torch.dtype | None:
        """The dtype of the model's first floating-point parameter (``bfloat16`` under ``bf16-true``)."""
        for param in self.model.parameters():
            if param.is_floating_point():
                return param.dtype
        return None

    def as_model_input(self, inputs: Tensor) -> Tensor:
        """``inputs`` in the model's parameter dtype if both are floating point; integer ids are returned as they
        are. Batches arrive in float32 (the data modules convert images after the transfer, past Lightning's
        ``Precision.convert_input``), so a ``bf16-true`` model gets ``bfloat16`` inputs here."""
        dtype = self.model_dtype()
        if dtype is not None and inputs.is_floating_point() and inputs.dtype != dtype:
            return inputs.to(dtype)
        return inputs

    def call_model(self, inputs: Tensor, mask: Tensor | None = None) -> Any:
        """Run the model (floating inputs cast to its dtype) with the mask under the argument name it takes.

        Tensors the model creates get its dtype too (the default dtype during the call, as Lightning's
        ``bf16-true`` sets for the whole step; the tasks compute losses and metrics under float32)."""
        dtype = self.model_dtype()
        inputs = self.as_model_input(inputs)
        if mask is not None and not bool(mask.all()):
            if "attention_mask" in self._forward_params:
                kwargs = {"attention_mask": mask}
            elif "mask" in self._forward_params:
                kwargs = {"mask": mask}
            else:
                raise ConfigError(f"the batch has padding but {type(self.model).__name__}.forward takes no mask")
        else:
            kwargs = {}
        with default_dtype(dtype):
            return self.model(inputs, **kwargs)

    def forward(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        return model_logits(self.call_model(inputs, mask))

    def configure_model(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        if self.activation_checkpointing:
            count = enable_activation_checkpointing(self.model)
            if not count:
                raise ConfigError(f"activation_checkpointing: no attention blocks found in {type(self.model).__name__}")
        if self.compile_model:
            self.model.compile()

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Task:
        # torchmetrics keeps metric states out of .half()/.bfloat16() but not out of .to(dtype), which is how
        # Lightning converts the module for bf16-true/16-true: put floating states (running losses) back to float32
        module = super()._apply(fn, *args, **kwargs)
        for metric in self.modules():
            if isinstance(metric, torchmetrics.Metric) and metric.dtype != torch.float32:
                metric._apply(_float32_floats)
        return module

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        """Loss of one batch of ``split`` ("train", "val", "test"), logging its metrics."""
        raise NotImplementedError

    def _shared_step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        with default_dtype(torch.float32):  # loss, mixing and metrics in float32 (bf16-true makes bf16 the default)
            return self._step(batch, split)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _eval_step(self, batch: dict[str, Tensor], batch_idx: int, split: str) -> None:
        """Metrics of the batch's own samples: on several processes the last batch may end with repeats that
        only keep the processes in step (:class:`~perceivers.train.data.EvalShardSampler`)."""
        size = batch["inputs"].shape[0]
        loader = self.trainer.val_dataloaders if split == "val" else self.trainer.test_dataloaders
        sampler = getattr(loader, "sampler", None)
        rows = sampler.real_rows(batch_idx, loader.batch_size) if isinstance(sampler, EvalShardSampler) else size
        if rows >= size:
            self._shared_step(batch, split)
        elif rows > 0:
            self._shared_step({k: v[:rows] if isinstance(v, Tensor) and v.ndim and v.shape[0] == size else v
                               for k, v in batch.items()}, split)
        else:  # repeats only: the forward pass a sharded model's processes take together, no metrics
            with torch.no_grad():
                self(batch["inputs"], batch.get("mask"))

    # ------------------------------------------------------------------ optimisation
    def _global_batch(self) -> int | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        return getattr(datamodule, "batch_size", None)

    def parameter_groups(self) -> list[dict[str, Any]]:
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.weight_decay_exclude_1d:
            return [{"params": [p for _, p in params]}]
        decay = [p for _, p in params if p.ndim > 1]
        no_decay = [p for _, p in params if p.ndim <= 1]
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        groups = self.parameter_groups()
        params = [p for group in groups for p in group["params"]]
        optimizer = _configured("optimizer", self.optimizer_factory, groups,
                                **fused_optimizer_kwargs(self.optimizer_factory, params))
        if self.scale_lr_with_batch:
            batch = self._global_batch()
            if batch is None:
                raise ConfigError("scale_lr_with_batch needs a datamodule with a batch_size")
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * batch / self.scale_lr_with_batch
                group["initial_lr"] = group["lr"]
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        target, bound = _factory_target(self.scheduler_factory)
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            params = {}
        if "total_steps" in params and bound.get("total_steps") is None:
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = _configured("lr_scheduler", self.scheduler_factory, optimizer, **kwargs)
        self._planned_schedule = (type(scheduler).__name__, schedule_length(vars(scheduler)))
        self._check_resumed_schedule()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config = {"scheduler": scheduler, "monitor": self.monitor, "interval": "epoch"}
        else:
            config = {"scheduler": scheduler, "interval": self.lr_interval}
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------ resuming
    def on_train_start(self) -> None:
        """Resume mid-epoch where the training loader was built before the checkpoint was read.

        Lightning hands the checkpoint's place in the epoch (the batches already trained on) to the loader
        when it builds it after reading the checkpoint, and starts iterating it there. A schedule's length
        (``estimated_stepping_batches`` in :meth:`configure_optimizers`) has the loader built, and its
        iterator started, before: so hand the place over now and start again from it, leaving the random
        state as the checkpoint restored it (a new iterator draws a seed from it).
        """
        loop = self.trainer.fit_loop
        fetcher = getattr(loop, "_data_fetcher", None)
        if not (loop.restarting and getattr(loop, "_combined_loader_states_to_load", None) and fetcher is not None
                and hasattr(loop, "_load_combined_loader_states")):
            return
        rng = torch.get_rng_state()
        loop._load_combined_loader_states()
        iter(fetcher)  # a new iterator, continuing after the trained batches
        torch.set_rng_state(rng)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is None or self.trainer.state.fn != "fit":
            return  # validate / test / predict restore no schedule
        self._checkpoint_schedules = [schedule_length(state) for state in checkpoint.get("lr_schedulers") or []
                                      if isinstance(state, dict)]
        self._check_resumed_schedule()

    def _check_resumed_schedule(self) -> None:
        """Stop before training when the checkpoint being resumed holds a schedule of another length than this run's.

        Lightning restores a scheduler's whole state, its length included, so a longer run would fail part-way
        (OneCycleLR: "Tried to step 40 times") or leave the schedule it planned. Runs once both the checkpoint
        (``on_load_checkpoint``) and this run's scheduler (``configure_optimizers``) are known, in either order.
        """
        if self._checkpoint_schedules is None or self._planned_schedule is None:
            return
        saved, (name, planned) = self._checkpoint_schedules, self._planned_schedule
        self._checkpoint_schedules = None
        if not saved or saved[0] is None or planned is None or saved[0][0] != planned[0] or saved[0] == planned:
            return  # nothing to compare (no fixed length, or another kind of schedule), or the same length
        (attribute, old), (_, new) = saved[0], planned
        unit = "steps" if self.lr_interval == "step" else "epochs"
        path = getattr(self.trainer, "ckpt_path", None) if self._trainer is not None else None
        raise ConfigError(
            f"the checkpoint {path or ''} holds a learning-rate schedule ({name}) planned for {old} {unit}, but this "
            f"run has {new} ({attribute}); resuming restores the checkpoint's schedule, which would fail or run out "
            f"after {unit[:-1]} {old}. Resume with the same trainer.max_epochs / trainer.max_steps (and batch size, "
            "limit_train_batches, accumulate_grad_batches, devices) as the run that wrote it, or start a new run "
            "(without --resume / --ckpt_path, or in another trainer.default_root_dir; the CLI cannot start a new "
            "schedule from a checkpoint's weights alone)"
        )

    # ------------------------------------------------------------------ gradients
    reports_gradient_norm = True  # NonFiniteGradientGuard: this task checks the norm it computes for clipping

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, and the :class:`~perceivers.train.callbacks.NonFiniteGradientGuard` check when the
        trainer has one: clipping by norm computes the total gradient norm anyway, and the guard reads that one
        (no extra pass); otherwise the guard computes the norm first. A non-finite norm drops the gradients, so
        the optimizer step changes nothing."""
        from lightning.pytorch.plugins.precision import Precision

        from .callbacks import NonFiniteGradientGuard, gradient_norm

        trainer = self.trainer
        guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGradientGuard)), None)
        if guard is None or not guard.active(trainer):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        plugin = trainer.precision_plugin
        params = list(plugin.main_params(optimizer))
        by_norm = (bool(gradient_clip_val) and (gradient_clip_algorithm or "norm") == "norm"  # a str enum
                   and type(plugin).clip_grad_by_norm is Precision.clip_grad_by_norm)
        if by_norm:  # what Precision.clip_grad_by_norm does, keeping the norm it returns
            guard.check(trainer, optimizer, torch.nn.utils.clip_grad_norm_(params, gradient_clip_val))
            return
        if guard.check(trainer, optimizer, gradient_norm(params)):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ checks before training
    def setup(self, stage: str) -> None:
        precision = str(getattr(self.trainer, "precision", "32-true")) if self._trainer is not None else "32-true"
        if (stage == "fit" and precision.startswith("bf16") and self.trainer.strategy.root_device.type == "cpu"
                and kernels.emulates_bf16()):
            rank_zero_warn(
                f"precision {precision} on a CPU without bfloat16 arithmetic (no AVX512-BF16 or AMX): perceivers' "
                "layers compute in float32 there and round to bfloat16 (PyTorch's emulated bfloat16 products run at "
                "about a quarter of the float32 rate), so it is no faster than 32-true (training steps 1.0-1.4x as "
                "long on an Ice Lake); use --trainer.precision 32-true unless you need bfloat16's rounding"
            )
        if stage == "fit" and precision == "16-true":
            raise ConfigError(
                "precision 16-true trains the float16 weights themselves, where AdamW's epsilon (1e-8) and small "
                "second moments underflow to 0 (NaN after one step here); train with 32-true, bf16-true, bf16-mixed "
                "or 16-mixed (GPUs: float16 autocast, float32 weights, gradient scaling); 16-true is for validate, "
                "test and predict"
            )

    def example_batch(self) -> dict[str, Tensor] | None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "example_batch"):
            return None
        return datamodule.example_batch()

    def summarize_with(self, batch: dict[str, Tensor]) -> None:
        """Give Lightning's model summary one sample of ``batch``: it then lists each layer's input and output
        sizes and the forward's FLOPs (``FlopCounterMode``, which counts perceivers' products in full:
        :mod:`perceivers.layers.flops`). Only for perceivers' own models (others may fail under the counter, e.g.
        transformers' under ``no_grad``), uncompiled, in one process or under plain DDP: the summary runs on
        rank 0 alone, where a sharded model's forward would wait for the other ranks."""
        strategy = self.trainer.strategy
        if (self.compile_model or not type(self.model).__module__.startswith("perceivers.")
                or not (isinstance(strategy, SingleDeviceStrategy) or type(strategy) is DDPStrategy)):
            return
        mask = batch.get("mask")
        self.example_input_array = (batch["inputs"][:1],) if mask is None else (batch["inputs"][:1], mask[:1])


class ClassificationTask(Task):
    """Classification of images ``[B, H, W, C]`` or sequences ``[B, L(, C)]`` with cross-entropy.

    Args:
        num_classes: classes; default: the model's output width (checked against the data's labels).
        label_smoothing: cross-entropy label smoothing.
        mixup_alpha, cutmix_alpha, cutmix_prob: MixUp / CutMix on image batches (0 = off; see
            :func:`perceivers.data.transforms.mix_batch`).
        top_k: the second accuracy reported (``acc_top5`` for 5), skipped when there are fewer classes.
        input_layout: ``"auto"`` (channels first for models whose forward takes ``pixel_values``),
            ``"channels_last"`` or ``"channels_first"`` — images arrive channels last.
        Other arguments as :class:`Task`.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        num_classes: int | None = None,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        cutmix_prob: float = 0.5,
        top_k: int = 5,
        input_layout: Literal["auto", "channels_last", "channels_first"] = "auto",
        model_name: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_interval: Literal["step", "epoch"] = "step",
        monitor: str = "val/loss",
        weight_decay_exclude_1d: bool = True,
        scale_lr_with_batch: int | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            model, model_name=model_name, model_kwargs=model_kwargs, optimizer=optimizer, lr_scheduler=lr_scheduler,
            lr_interval=lr_interval, monitor=monitor, weight_decay_exclude_1d=weight_decay_exclude_1d,
            scale_lr_with_batch=scale_lr_with_batch, compile=compile, activation_checkpointing=activation_checkpointing,
        )
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup_alpha, self.cutmix_alpha, self.cutmix_prob = mixup_alpha, cutmix_alpha, cutmix_prob
        self.top_k = top_k
        if input_layout == "auto":
            input_layout = "channels_first" if "pixel_values" in self._forward_params else "channels_last"
        self.input_layout = input_layout
        self.metrics = nn.ModuleDict()

    def _model_inputs(self, inputs: Tensor) -> Tensor:
        if self.input_layout == "channels_first" and inputs.ndim == 4:
            return inputs.permute(0, 3, 1, 2)
        return inputs

    def forward(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        return model_logits(self.call_model(self._model_inputs(inputs), mask))

    # ------------------------------------------------------------------ set-up and checks
    def setup(self, stage: str) -> None:
        super().setup(stage)
        data_classes = getattr(getattr(self.trainer, "datamodule", None), "num_classes", None)
        batch = self.example_batch()
        model_classes = None
        if batch is not None:
            try:
                with torch.no_grad():
                    was = self.model.training
                    self.model.eval()
                    logits = self(batch["inputs"], batch.get("mask"))
                    self.model.train(was)
            except (ValueError, TypeError, RuntimeError) as err:
                shape = tuple(batch["inputs"].shape)
                raise ConfigError(
                    f"{type(self.model).__name__} cannot take the data's inputs (batch shape {shape}, "
                    f"{'channels first' if self.input_layout == 'channels_first' else 'channels last'} for images): "
                    f"{err}"
                ) from err
            if logits.ndim != 2:
                raise ConfigError(f"{type(self.model).__name__} returns logits of shape {tuple(logits.shape)}; "
                                  "classification needs [batch, num_classes]")
            model_classes = logits.shape[-1]
            self.summarize_with(batch)
        if self.num_classes is None:
            self.num_classes = model_classes or data_classes
        if self.num_classes is None:
            raise ConfigError("num_classes is unknown: set model.init_args.num_classes or use a datamodule with classes")
        if model_classes is not None and model_classes != self.num_classes:
            raise ConfigError(f"num_classes={self.num_classes} but the model outputs {model_classes} logits")
        if data_classes is not None and data_classes > self.num_classes:
            raise ConfigError(
                f"labels out of range: the data has {data_classes} classes (labels 0..{data_classes - 1}) but the "
                f"model has {self.num_classes} outputs; set the model's num_classes/num_labels to {data_classes}"
            )
        self._make_metrics()

    def _make_metrics(self) -> None:
        if len(self.metrics):
            return
        for split in ("train", "val", "test"):
            self.metrics[f"{split}_acc"] = torchmetrics.classification.MulticlassAccuracy(
                self.num_classes, top_k=1, average="micro")
            if split != "train" and self.num_classes > self.top_k > 1:
                self.metrics[f"{split}_acc_top{self.top_k}"] = torchmetrics.classification.MulticlassAccuracy(
                    self.num_classes, top_k=self.top_k, average="micro")
            self.metrics[f"{split}_loss"] = torchmetrics.MeanMetric()

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        inputs, target, mask = batch["inputs"], batch["target"], batch.get("mask")
        mixing = split == "train" and (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and inputs.ndim == 4
        if mixing:
            inputs, soft = mix_batch(inputs, target, self.num_classes, mixup_alpha=self.mixup_alpha,
                                     cutmix_alpha=self.cutmix_alpha, cutmix_prob=self.cutmix_prob,
                                     label_smoothing=self.label_smoothing)
            logits = self(inputs, mask)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            target = soft.argmax(-1)  # accuracy against each mixed sample's dominant label
        else:
            logits = self(inputs, mask)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        batch_size = target.shape[0]
        self.metrics[f"{split}_loss"](loss.detach(), batch_size)
        self.log(f"{split}/loss", self.metrics[f"{split}_loss"], on_step=split == "train", on_epoch=True,
                 prog_bar=True, batch_size=batch_size)
        for key, metric in self.metrics.items():
            if key.startswith(f"{split}_acc"):
                metric(logits.detach(), target)
                name = key.removeprefix(f"{split}_")
                self.log(f"{split}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "acc",
                         batch_size=batch_size)
        return loss


    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = self(batch["inputs"], batch.get("mask"))
        probs = logits.float().softmax(-1)
        return {"probs": probs, "prediction": probs.argmax(-1)}


class MaskedLMTask(Task):
    """Masked language modelling on byte ids: cross-entropy over the masked positions only.

    Batches carry the corrupted ``inputs [B, L]``, ``labels [B, L]`` (-100 = not a target) and ``mask``;
    the masking itself is done by the datamodule. Reports loss, accuracy and perplexity on the targets.

    Models: anything taking ``[B, L]`` ids (and a mask) and returning ``[B, L, vocab]`` logits —
    :class:`~perceivers.PerceiverLM`, or ``model_name: language-perceiver`` through ``create_model``.

    Args:
        vocab_size: logits width (262 for the byte tokenizer).
        Other arguments as :class:`Task`.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        vocab_size: int = 262,
        model_name: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_interval: Literal["step", "epoch"] = "step",
        monitor: str = "val/loss",
        weight_decay_exclude_1d: bool = True,
        scale_lr_with_batch: int | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            model, model_name=model_name, model_kwargs=model_kwargs, optimizer=optimizer, lr_scheduler=lr_scheduler,
            lr_interval=lr_interval, monitor=monitor, weight_decay_exclude_1d=weight_decay_exclude_1d,
            scale_lr_with_batch=scale_lr_with_batch, compile=compile, activation_checkpointing=activation_checkpointing,
        )
        self.vocab_size = vocab_size
        self.metrics = nn.ModuleDict()
        for split in ("train", "val", "test"):
            self.metrics[f"{split}_loss"] = torchmetrics.MeanMetric()
            self.metrics[f"{split}_acc"] = torchmetrics.classification.MulticlassAccuracy(
                vocab_size, top_k=1, average="micro", ignore_index=-100)
            self.metrics[f"{split}_perplexity"] = torchmetrics.text.Perplexity(ignore_index=-100)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        batch = self.example_batch()
        if batch is None:
            return
        try:
            with torch.no_grad():
                logits = self(batch["inputs"], batch.get("mask"))
        except (ValueError, TypeError, RuntimeError) as err:
            raise ConfigError(f"{type(self.model).__name__} cannot take byte ids of shape "
                              f"{tuple(batch['inputs'].shape)}: {err}") from err
        expected = (*batch["inputs"].shape, self.vocab_size)
        if tuple(logits.shape) != expected:
            raise ConfigError(f"masked LM needs logits {expected} ([batch, length, vocab_size]), the model gives "
                              f"{tuple(logits.shape)}")
        self.summarize_with(batch)

    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        logits = self(batch["inputs"], batch.get("mask")).float()
        labels = batch["labels"]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        targets = int((labels != -100).sum())
        self.metrics[f"{split}_loss"](loss.detach(), targets)
        self.log(f"{split}/loss", self.metrics[f"{split}_loss"], on_step=split == "train", on_epoch=True,
                 prog_bar=True, batch_size=labels.shape[0])
        self.metrics[f"{split}_acc"](logits.detach().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        self.log(f"{split}/acc", self.metrics[f"{split}_acc"], on_step=False, on_epoch=True,
                 batch_size=labels.shape[0])
        if split != "train":
            self.metrics[f"{split}_perplexity"].update(logits.detach(), labels)
            self.log(f"{split}/perplexity", self.metrics[f"{split}_perplexity"], on_step=False, on_epoch=True,
                     batch_size=labels.shape[0])
        else:
            self.log("train/perplexity", loss.detach().exp(), on_step=True, on_epoch=False)
        return loss

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """The masked bytes predicted: ``filled`` (the inputs with each target replaced by the model's most likely
        byte), ``original`` (with the true bytes), ``targets`` (where the labels are), ``mask`` (real tokens),
        all ``[B, L]``."""
        inputs, labels = batch["inputs"], batch["labels"]
        targets = labels != -100
        filled = torch.where(targets, self(inputs, batch.get("mask")).argmax(-1), inputs)
        mask = batch.get("mask", torch.ones_like(targets))
        return {"filled": filled, "original": torch.where(targets, labels, inputs), "targets": targets, "mask": mask}

