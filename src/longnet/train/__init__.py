"""longnet.train: the trainer, its configuration tree, the model families, checkpoints, metrics,
schedules and perplexity evaluation.

``longnet train`` and ``longnet eval`` are thin command-line layers over :func:`train` and
:func:`perplexities`.
"""

from longnet.train.checkpoint import (
    TrainerCheckpoint,
    latest_checkpoint,
    load_trainer_checkpoint,
    save_trainer_checkpoint,
)
from longnet.train.config import TrainConfig, default_cache_dir, resolve_config
from longnet.train.evaluate import PerplexityResult, mean_loss, model_for_length, perplexities
from longnet.train.families import HFFamily, LongNetFamily, ModelFamily, family_for
from longnet.train.metrics import MetricsLog, plot_losses, read_metrics
from longnet.train.optim import build_optimizer, parameter_groups
from longnet.train.rundir import RunFolderError, open_run_dir
from longnet.train.schedule import learning_rate
from longnet.train.trainer import TrainingDiverged, TrainingInterrupted, TrainResult, build_config, train

__all__ = [
    "TrainConfig",
    "resolve_config",
    "ModelFamily",
    "LongNetFamily",
    "HFFamily",
    "family_for",
    "default_cache_dir",
    "train",
    "TrainResult",
    "TrainingInterrupted",
    "TrainingDiverged",
    "build_config",
    "learning_rate",
    "build_optimizer",
    "parameter_groups",
    "TrainerCheckpoint",
    "save_trainer_checkpoint",
    "load_trainer_checkpoint",
    "latest_checkpoint",
    "MetricsLog",
    "read_metrics",
    "plot_losses",
    "RunFolderError",
    "open_run_dir",
    "PerplexityResult",
    "perplexities",
    "mean_loss",
    "model_for_length",
]
