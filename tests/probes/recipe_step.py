"""Run by tests/test_trainer.py in a fresh process (no launcher): one training step of the preference
recipe object, driven method by method. Prints one JSON line: the step's loss, whether the update was
skipped, and the step counter before and after the bookkeeping."""

from __future__ import annotations

import json
import sys

from hdpo_ds.runtime import stop


def main(ds_path: str, overrides: list[str]) -> None:
    from hdpo_ds.config import load_config
    from hdpo_ds.recipes.preference import PreferenceRecipe
    from hdpo_ds.runtime import dist

    dist.fill_single_process_env()  # a world of one, as `python launch/train.py` gets
    recipe = PreferenceRecipe(load_config(None, overrides), ds_path)
    recipe.setup()
    assignment = recipe.next_assignment()
    outcome = recipe.train_step(assignment)
    before = recipe.step
    recipe.after_step(outcome)
    recipe.session.run_logger.finish("FINISHED")
    print(
        json.dumps(
            {
                "loss": outcome.metrics["loss"],
                "skipped": outcome.skipped,
                "pairs": [int(i) for i in assignment.pair_indices],
                "step_before": before,
                "step_after": recipe.step,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    stop.exit_process(0)  # no interpreter teardown after a finished probe (runtime/stop.py)
