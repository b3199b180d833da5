"""``perceivers fit | validate | test | predict``: LightningCLI with this project's defaults.

What it adds to a plain LightningCLI:

* a run folder (``trainer.default_root_dir``, e.g. ``runs/digits``) holding ``config.yaml``,
  ``metrics.csv`` (plus TensorBoard logs when ``tensorboard`` is installed), ``checkpoints/`` and
  ``plots/``; checkpoints are written atomically;
* ``--resume``: continue ``fit`` from ``checkpoints/last.ckpt`` after a crash (step count, optimizer,
  schedule and metric curves continue);
* a ``checkpoint`` section (ModelCheckpoint: best by ``val/loss`` + ``last.ckpt``, which is rewritten at every
  epoch end: :class:`~perceivers.train.callbacks.LatestCheckpoint`), a ``plots``
  section (learning curves, cross-attention picture) and a ``grad_guard`` section
  (:class:`~perceivers.train.callbacks.NonFiniteGradientGuard`: skip steps with NaN/Inf gradients, stop
  after ``max_consecutive`` in a row) in every config; a NaN/Inf loss stops the run;
* under ``torchrun`` the trainer's ``devices`` / ``num_nodes`` / ``strategy`` default to what torchrun
  launched (DDP), so the single-process command runs unchanged on many processes;
* ``--trainer.strategy fsdp`` (or ``fsdp2``) means :class:`~perceivers.train.strategies.FSDP2Strategy`
  (FSDP2 per attention block, CPU or CUDA, full checkpoints);
* two messages of its dependencies that a user cannot act on are left out while it runs
  (:func:`quiet_dependencies`).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import logging
import os
import re
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from ..allocator import keep_freed_memory
from ..data.tokenizer import ByteTokenizer
from ..safe_files import atomic_write_text
from .callbacks import (
    LatestCheckpoint,
    NonFiniteGradientGuard,
    NonFiniteLossGuard,
    ReplicaCheck,
    ResumableMetrics,
    RNGState,
    TrainingPlots,
)
from .checkpoint_io import AtomicCheckpointIO
from .loggers import RunCSVLogger
from .strategies import FSDP2Strategy
from .tasks import ConfigError, Task

__all__ = ["PerceiversCLI", "check_ckpt_path", "quiet_dependencies", "run_cli"]


class ArgumentParser(LightningArgumentParser):
    """Lightning's parser whose errors lead with what was wrong: a one-line usage (``--help`` lists the
    options) and, for a value of the wrong type, ``--key: expected T, got V`` before jsonargparse's
    account of every type it tried."""

    def print_usage(self, file: Any = None) -> None:
        (file or sys.stdout).write(f"usage: {self.prog.replace(' [options]', '')} [options]\n")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # parsers of nested classes raise their errors into the message of the parser that exits
        summary = _wrong_value(message) if self.exit_on_error else None
        super().error(message if summary is None else f"{summary}\n{message}", ex)


_TYPE = re.compile(r"<class '([\w.]+)'>")
_LITERAL = re.compile(r"typing\.Literal\[(.*)\]")


def _type_names(kinds: list[str]) -> str:
    """jsonargparse's type names → ``int or str``; Literals → ``one of 1, 'a', …`` (their values together)."""
    literals = [_LITERAL.fullmatch(k) for k in kinds]
    if all(literals):
        return f"one of {', '.join(m.group(1) for m in literals)}"
    return " or ".join(f"one of {m.group(1)}" if m else _TYPE.sub(r"\1", k) for k, m in zip(kinds, literals))


def _wrong_value(message: str, prefix: str = "") -> str | None:
    """``--key: expected T, got V`` from jsonargparse's message for a value no type of a Union accepts
    (``None`` for other messages); a subclass's own option (``--data.init_args.batch_size``) is followed in."""
    lines = message.splitlines()
    head = re.fullmatch(r'\s*Parser key "([^"]+)":', lines[0]) if lines else None
    if head is None:
        return None
    key = prefix + head.group(1)
    body = textwrap.dedent("\n".join(lines[1:]))
    simple = re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", body.strip(), re.DOTALL)
    if simple:
        return f"--{key}: expected {_type_names([simple.group(1)])}, got {simple.group(2)}"
    if not body.startswith("Does not validate against any of the Union subtypes"):
        return None
    errors = re.search(r"^Errors:\n(.*?)^Given value type:", body, re.DOTALL | re.MULTILINE)
    given = re.search(r"^Given value: (.*)$", body, re.MULTILINE)
    if errors is None or given is None:
        return None
    entries = [e for e in re.split(r"^  - ", errors.group(1), flags=re.MULTILINE)
               if e.strip() and e.strip() != "Expected a <class 'NoneType'>"]
    if entries and all(re.fullmatch(r"Expected a [^\n]+", e.strip()) for e in entries):
        kinds = [e.strip()[len("Expected a "):] for e in entries]
        return f"--{key}: expected {_type_names(kinds)}, got {given.group(1)}"
    if len(entries) == 1:
        subclass = re.match(r"Problem with given class_path '([^']+)':\n(.*)", entries[0], re.DOTALL)
        if subclass:
            inner = textwrap.dedent(subclass.group(2)).strip()
            option = re.fullmatch(r"Option '([^']+)' is not accepted", inner)
            if option:
                return f"--{key}.init_args.{option.group(1)}: not an option of {subclass.group(1)}"
            return _wrong_value(inner, f"{key}.init_args.")
    return None


class PerceiversCLI(LightningCLI):
    """LightningCLI over :class:`~perceivers.train.tasks.Task` subclasses and any LightningDataModule."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", ArgumentParser)
        kwargs.setdefault("model_class", Task)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here, before any of our checks: check the file first
        if self.config.get("subcommand"):
            check_ckpt_path(self.config[self.config.subcommand].get("ckpt_path"))
        before = self._model_settings()
        super()._parse_ckpt_path()
        after = self._model_settings()
        replaced = [f"  model.{key}: {before[key]!r} -> {after.get(key)!r}" for key in before
                    if key in after and before[key] != after[key]]
        if replaced:  # Lightning rebuilds the model from the checkpoint's settings, whatever this run asked for
            rank_zero_warn(
                f"--ckpt_path: the model is built with the settings saved in the checkpoint "
                f"{self.config[self.config.subcommand]['ckpt_path']}, which replace these of this run "
                f"(command line or config):\n" + "\n".join(replaced) + "\nTo change them, start a new run from "
                "the checkpoint's weights (e.g. perceivers.train.Task.load_from_checkpoint in Python)")

    def _model_settings(self) -> dict[str, Any]:
        """The subcommand's model settings, flattened to ``dotted.key -> value``."""
        if not self.config.get("subcommand"):
            return {}
        model = self.config[self.config.subcommand].get("model")
        return dict(_flatten(model.as_dict() if hasattr(model, "as_dict") else model or {}))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LatestCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/loss",
            "checkpoint.mode": "min",
            "checkpoint.filename": "best-{epoch}-{step}",
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1,
            "checkpoint.enable_version_counter": False,  # one last.ckpt per run folder, overwritten
            "trainer.default_root_dir": "runs/default",
        })
        parser.add_lightning_class_args(TrainingPlots, "plots")
        # skip optimizer steps with NaN/Inf gradients, stop after max_consecutive in a row (0 = off)
        parser.add_lightning_class_args(NonFiniteGradientGuard, "grad_guard")
        parser.add_argument("--resume", type=bool, default=False,
                            help="fit: continue from <default_root_dir>/checkpoints/last.ckpt when it exists")
        parser.add_argument("--num_threads", type=int | None, default=None,
                            help="torch intra-op threads per process (torch.set_num_threads); 1 is fastest for "
                                 "small models on busy CPUs. Default: torch's choice (Lightning's under CPU DDP)")

    # ------------------------------------------------------------------ configuration fix-ups
    def before_instantiate_classes(self) -> None:
        keep_freed_memory()  # large activations reused from the heap, not page-faulted in every step
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = config.get("num_threads")
        if threads:
            torch.set_num_threads(threads)
            os.environ["OMP_NUM_THREADS"] = str(threads)  # also what Lightning's CPU DDP set-up reads
        trainer = config["trainer"]
        world = os.environ.get("WORLD_SIZE")
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if world and local and int(world) > 1:  # launched by torchrun (or another elastic launcher)
            if trainer.get("devices") in ("auto", None):
                trainer["devices"] = int(local)
            if trainer.get("num_nodes", 1) == 1 and int(world) > int(local):
                trainer["num_nodes"] = int(world) // int(local)
            if trainer.get("strategy") in ("auto", None):
                trainer["strategy"] = "ddp"
        if trainer.get("strategy") == "fsdp":
            # Lightning's "fsdp" (FSDP1) refuses CPUs and shards nothing below the root without a wrap policy;
            # FSDP2Strategy shards every attention block, on CPU (gloo) and CUDA (NCCL) alike.
            trainer["strategy"] = FSDP2Strategy.strategy_name
            rank_zero_info("--trainer.strategy fsdp: using perceivers.train.FSDP2Strategy (fully_shard per attention "
                           "block); give lightning.pytorch.strategies.FSDPStrategy as class_path for Lightning's FSDP1")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config["trainer"]
        root = Path(trainer_config.get("default_root_dir") or "runs/default")
        if trainer_config.get("logger") in (None, True):
            loggers: list[Any] = [RunCSVLogger(save_dir=str(root))]
            if importlib.util.find_spec("tensorboard") is not None:
                from lightning.pytorch.loggers import TensorBoardLogger

                loggers.append(TensorBoardLogger(save_dir=str(root), name="tensorboard", version=""))
            kwargs["logger"] = loggers
        if not trainer_config.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        checkpoint = config.get("checkpoint")
        callbacks = list(trainer_config.get("callbacks") or [])
        epoch_end_last = None
        if isinstance(checkpoint, ModelCheckpoint):
            if checkpoint.dirpath is None:
                checkpoint.dirpath = os.path.realpath(root / "checkpoints")
            if checkpoint.save_last and checkpoint._every_n_train_steps and not checkpoint.every_n_epochs:
                # step-interval checkpoints skip epoch ends; keep last.ckpt current there too (resume, final state)
                epoch_end_last = LatestCheckpoint(dirpath=checkpoint.dirpath, save_top_k=0, save_last=True,
                                                 every_n_epochs=1, enable_version_counter=False)
        callbacks += [ResumableMetrics(), RNGState(), ReplicaCheck(), NonFiniteLossGuard()]
        trainer_config["callbacks"] = callbacks
        evaluating = self.subcommand not in (None, "fit")
        if evaluating:  # test / validate / predict in a run's folder: its config.yaml records how it was trained
            self.save_config_callback = None
        trainer = super().instantiate_trainer(**kwargs)
        if evaluating:  # and its hparams.yaml too
            for logger in trainer.loggers:
                logger.log_hyperparams = _keep_recorded_hyperparameters
        if epoch_end_last is not None:  # after the configured one, which stays trainer.checkpoint_callback
            trainer.callbacks.append(epoch_end_last)
        return trainer

    # ------------------------------------------------------------------ subcommand hooks
    def before_fit(self) -> None:
        config = self.config_init["fit"]
        if config.get("resume") and not config.get("ckpt_path"):
            last = self.last_checkpoint()
            if last is not None and last.is_file():
                config["ckpt_path"] = str(last)
                rank_zero_info(f"--resume: continuing from {last}")
            else:
                rank_zero_info(f"--resume: no checkpoint at {last}; starting a fresh run")
        elif config.get("resume"):
            rank_zero_info(f"--resume: using the given ckpt_path {config['ckpt_path']}")
        check_ckpt_path(config.get("ckpt_path"))

    def before_validate(self) -> None:
        check_ckpt_path(self.config_init["validate"].get("ckpt_path"))

    def before_test(self) -> None:
        check_ckpt_path(self.config_init["test"].get("ckpt_path"))

    def before_predict(self) -> None:
        check_ckpt_path(self.config_init["predict"].get("ckpt_path"))

    def last_checkpoint(self) -> Path | None:
        callback = self.trainer.checkpoint_callback
        if callback is None or callback.dirpath is None:
            return None
        return Path(callback.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        callback = self.trainer.checkpoint_callback
        lines = []
        if callback is not None:
            if callback.best_model_path:
                lines.append(f"best checkpoint: {callback.best_model_path}")
            last = self.last_checkpoint()
            if last is not None and last.is_file():
                lines.append(f"last checkpoint: {last}")
        for logger in self.trainer.loggers:
            if isinstance(logger, RunCSVLogger):
                lines.append(f"metrics: {Path(logger.log_dir) / 'metrics.csv'}")
        for cb in self.trainer.callbacks:
            if isinstance(cb, TrainingPlots):
                lines += [f"plot: {p}" for p in cb.written]
        if lines:
            print("\n".join(lines), flush=True)


    def predict(self, **kwargs: Any) -> list[Any] | None:
        """``Trainer.predict``, then ``<default_root_dir>/predictions.csv`` (one row per sample, in the dataset's
        order, the samples of every process) written by rank 0."""
        kwargs.setdefault("return_predictions", True)
        outputs = self.trainer.predict(**kwargs)
        samples = gather_predictions(self.trainer, outputs or [])
        if samples and self.trainer.is_global_zero:
            path = write_predictions(samples, Path(self.trainer.default_root_dir) / "predictions.csv",
                                     getattr(self.datamodule, "class_names", None))
            if path is not None:
                print(f"predictions: {path}", flush=True)
        return outputs


def _keep_recorded_hyperparameters(*args: Any, **kwargs: Any) -> None:
    """A logger's ``log_hyperparams`` outside ``fit``: the run's ``hparams.yaml`` stays the training's."""


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


# ckpt_path values Lightning resolves itself (``"registry:<name>"`` too), not file names
CKPT_PATH_KEYWORDS = ("best", "last", "hpc", "registry")


def check_ckpt_path(ckpt_path: str | os.PathLike | None) -> None:
    """Raise :class:`~perceivers.train.tasks.ConfigError` naming ``ckpt_path`` when it is a local path that does
    not exist (Lightning would fail with a traceback once the trainer is set up).

    Lightning's keywords (``best``, ``last``, ``hpc``, ``registry[:…]``) and URLs (``s3://…``) are left to
    Lightning, and so are folders (sharded FSDP / DeepSpeed checkpoints are folders).
    """
    if ckpt_path is None:
        return
    value = str(ckpt_path)
    if value.split(":", 1)[0] in CKPT_PATH_KEYWORDS or "://" in value:
        return
    path = Path(value).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip archive (or a pickle)
            raise ConfigError(f"ckpt_path {value} is not a checkpoint (a torch.save archive, as Lightning writes): "
                              f"its first bytes are {head!r}" + (" (an empty file)" if not head else ""))
    if path.exists():
        return
    where = "" if path.is_absolute() else f" (here: {path.resolve()})"
    raise ConfigError(f"ckpt_path {value} does not exist{where}; give the path of a checkpoint file, e.g. "
                      "runs/digits/checkpoints/last.ckpt")


def prediction_samples(outputs: list[Any], indices: list[list[int]] | None = None
                       ) -> list[tuple[int, dict[str, Tensor]]]:
    """Batched prediction outputs (dicts of ``[B, …]`` tensors) → ``(dataset index, sample)`` pairs, on the CPU.

    ``indices``: each batch's dataset indices (Lightning records them while predicting); without them the
    samples are numbered in order.
    """
    samples: list[tuple[int, dict[str, Tensor]]] = []
    for b, batch in enumerate(outputs):
        if not isinstance(batch, dict):
            return []
        size = next((v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.ndim), 0)
        rows = {k: v.detach().cpu() for k, v in batch.items() if isinstance(v, Tensor) and v.ndim and v.shape[0] == size}
        numbers = indices[b] if indices is not None and b < len(indices) else range(len(samples), len(samples) + size)
        samples += [(int(n), {k: v[i] for k, v in rows.items()}) for i, n in zip(range(size), numbers)]
    return samples


def gather_predictions(trainer: Trainer, outputs: list[Any]) -> list[tuple[int, dict[str, Tensor]]]:
    """Every process's predictions as ``(dataset index, sample)`` pairs in the dataset's order on rank 0 (its own
    elsewhere), each sample once: on several processes each predicts its share of the samples (repeating
    one at the end to stay in step with the others)."""
    batch_sampler = getattr(trainer.predict_dataloaders, "batch_sampler", None)
    samples = prediction_samples(outputs, getattr(batch_sampler, "seen_batch_indices", None))
    if trainer.world_size == 1 or not dist.is_initialized():
        return samples
    shares: list[Any] | None = [None] * trainer.world_size if trainer.is_global_zero else None
    dist.gather_object(samples, shares, dst=0)  # pickled between this run's own processes
    if shares is None:
        return samples
    return sorted({n: (n, sample) for share in shares for n, sample in share}.values(), key=lambda pair: pair[0])


def write_predictions(samples: list[tuple[int, dict[str, Tensor]]], path: Path, class_names: list[str] | None = None
                      ) -> Path | None:
    """``(dataset index, sample)`` pairs (:func:`prediction_samples`) → a CSV, one row per sample (written
    atomically); ``None`` for predictions of another kind.

    Classification (``prediction``, ``probs``): index, prediction, class, probability. Masked language
    modelling (``filled``, ``original``, ``targets``, ``mask``): index, masked, correct, the text with the
    masked bytes predicted, the original text.
    """
    if not samples:
        return None
    numbers, samples = [n for n, _ in samples], [s for _, s in samples]
    if all("prediction" in s for s in samples):
        header, rows = ["index", "prediction", "class", "probability"], _class_rows(samples, class_names)
    elif all("filled" in s for s in samples):
        header, rows = ["index", "masked", "correct", "prediction", "text"], _filled_rows(samples)
    else:
        return None
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows((n, *row) for n, row in zip(numbers, rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buffer.getvalue())
    return path


def _class_rows(samples: list[dict[str, Tensor]], class_names: list[str] | None) -> Iterator[tuple]:
    for sample in samples:
        pred = int(sample["prediction"])
        name = class_names[pred] if class_names and pred < len(class_names) else str(pred)
        yield pred, name, f"{float(sample['probs'][pred]):.6f}"


def _filled_rows(samples: list[dict[str, Tensor]]) -> Iterator[tuple]:
    tokenizer = ByteTokenizer()
    for s in samples:
        filled, original, targets, keep = s["filled"], s["original"], s["targets"], s["mask"]
        correct = int((filled[targets] == original[targets]).sum())
        yield int(targets.sum()), correct, tokenizer.decode(filled[keep]), tokenizer.decode(original[keep])


class _NoAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


@contextlib.contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Leave out, inside the block, Lightning's advertisement for its cloud logger (at the start of every run) and
    torch 2.13's ``FutureWarning`` about ``LeafSpec``, which Lightning's own code triggers; every other message,
    warning and error comes through."""
    logger, advert = logging.getLogger("lightning.pytorch.utilities.rank_zero"), _NoAdvert()
    logger.addFilter(advert)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        logger.removeFilter(advert)


def run_cli(argv: list[str], *, prog: str = "perceivers") -> PerceiversCLI:
    """Run the CLI on ``argv`` (``["fit", "--config", ...]``) as if typed after ``prog``.

    ``sys.argv`` is set to ``[prog, *argv]`` while it runs, so processes Lightning launches itself
    (``strategy=ddp`` without torchrun) repeat the same command.
    """
    saved = sys.argv
    sys.argv = [saved[0] if saved and saved[0] else prog, *argv]
    ok = False
    try:
        with quiet_dependencies():
            cli = PerceiversCLI(args=None)
        ok = True
    finally:
        sys.argv = saved
        _close_process_group(wait=ok)
    return cli


def _close_process_group(wait: bool) -> None:
    """Close the process group a multi-process command opened; after a success first wait for every process,
    so none exits while another still talks to it (with gloo a process that left early was seen to abort)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
