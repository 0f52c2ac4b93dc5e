"""Fine-tuning DiffusionGemma with its training objective (mlx-lm's tuner, diffusion parts).

``objective`` is the loss, ``make_draws`` its randomness, ``datasets`` turns mlx-lm's JSONL
formats (or ``Example`` lists) into batches, ``train`` runs mlx-lm's loop with them and
``utils`` says what trains and reads/writes adapter files, ``weight_average`` keeps a
moving average of the trained weights, ``stop`` ends a run on a signal with a save.
"""

from .datasets import DataError, Example, iterate_batches, load_dataset
from .draws import make_draws
from .objective import Loss, objective, prepare_for_training
from .trainer import TrainingArgs, evaluate, train
from .utils import AdapterError, load_adapters, save_adapters, setup_fine_tuning
from .weight_average import WeightAverage, WeightAverageError

__all__ = [
    "AdapterError", "DataError", "Example", "Loss", "TrainingArgs", "evaluate", "iterate_batches",
    "load_adapters", "load_dataset", "make_draws", "objective", "prepare_for_training", "save_adapters",
    "setup_fine_tuning", "train", "WeightAverage", "WeightAverageError",
]
