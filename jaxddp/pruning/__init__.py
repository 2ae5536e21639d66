"""Data pruning: train on the examples that matter, data-parallel, exact and resumable.

* outputs.py: `per_example_outputs`, the model over a whole split on every device and
  process, each example once, returning per-example logits, losses, correctness,
  penultimate embeddings and gradient norms in the dataset's index order.
* scores.py: the difficulty scores (el2n, grand, forgetting, prototype, random), a
  registry by config.data_pruning.score; `python -m jaxddp.score` writes them.
* select.py: which examples to keep (hard, easy, random, ccs; class balancing) and
  InfoBatch's per-epoch weights, as pure NumPy functions.
* training.py: what a training run needs: the static subset, the per-example tables
  in the state, and InfoBatch's epochs and learning-rate positions.
"""

from jaxddp.pruning.training import (InfoBatchEpochs, check_dataset, check_recipe, describe,
                                     initial_tables, is_dynamic, kept_examples, load_scores,
                                     schedule_step)

__all__ = ["InfoBatchEpochs", "check_dataset", "check_recipe", "describe", "initial_tables",
           "is_dynamic", "kept_examples", "load_scores", "schedule_step"]
