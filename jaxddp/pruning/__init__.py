"""Data pruning: train on the examples that matter, data-parallel, exact and resumable.

* scores.py: the difficulty scores (el2n, grand, forgetting, prototype, random), a
  registry by config.data_pruning.score; `python -m jaxddp.score` writes them from
  per-example outputs (jaxddp.evaluate).
* select.py: which examples to keep (hard, easy, random, ccs; class balancing) and
  InfoBatch's per-epoch weights, as pure NumPy functions.
* tables.py: the per-example tables a run keeps in its state (losses, forgetting).
* training.py: data pruning as a training run sees it, one object made from the config
  (`create`): none, a static subset, or a dynamic kind (DYNAMIC: InfoBatch) that plans
  the run epoch by epoch.
"""

from jaxddp.pruning.tables import Epoch, ExampleTables
from jaxddp.pruning.training import (DYNAMIC, DataPruning, InfoBatch, Part, anneal_epoch,
                                     check_dataset, create, kept_examples, load_scores,
                                     scores_digest)

__all__ = ["DYNAMIC", "DataPruning", "Epoch", "ExampleTables", "InfoBatch", "Part",
           "anneal_epoch", "check_dataset", "create", "kept_examples", "load_scores",
           "scores_digest"]
