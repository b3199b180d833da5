"""``make demo``: train the default digits recipe from scratch, test it, and say where everything went.

Equivalent to ``perceivers fit --config digits`` (the recipe ``perceivers/recipes/digits.yaml``) followed
by ``perceivers test`` on the best checkpoint, in one process. Extra arguments are passed to ``fit``
(``python -m perceivers.demo --trainer.max_epochs 5``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from perceivers.cli import DEFAULT_CONFIG, RecipeError, recipe_path

    extra = list(sys.argv[1:] if argv is None else argv)
    try:
        config = recipe_path(DEFAULT_CONFIG)
    except RecipeError as err:  # an installation without its package data
        print(f"demo: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    from perceivers.train.cli import quiet_dependencies, run_cli

    imported = time.perf_counter()
    cli = run_cli(["fit", "--config", str(config), *extra])
    trained = time.perf_counter()
    trainer = cli.trainer
    if not trainer.is_global_zero:
        return 0
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    with quiet_dependencies():
        results = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None, verbose=False)
    metrics = results[0] if results else {}
    accuracy = float(metrics.get("test/acc", float("nan")))
    print()
    print(f"digits test accuracy: {accuracy:.2%} ({len(cli.datamodule.datasets['test'])} held-out images)")
    print(f"training time: {trained - imported:.1f} s for {trainer.current_epoch} epochs, {trainer.global_step} "
          f"steps (plus {imported - start:.1f} s importing Lightning)")
    if best:
        print(f"checkpoint (best by {trainer.checkpoint_callback.monitor}): {best}")
    for callback in trainer.callbacks:
        for path in getattr(callback, "written", []):
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
