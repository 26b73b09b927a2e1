"""Training: named configs with overrides, the trainer, checkpoints and DDP.

    from eqprop.training import Trainer, load_config
    Trainer(load_config("fmnist_cpu", ["epochs=1"])).fit()
"""
from .config import ConfigError, list_configs, load_config
from .trainer import Trainer, TrainingError

__all__ = ["ConfigError", "Trainer", "TrainingError", "list_configs", "load_config"]
