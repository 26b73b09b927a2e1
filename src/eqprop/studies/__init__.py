"""Studies built on the trainer: experiments that compare estimators on one network.

    eqprop study algorithms [key=value ...]   every learning rule, same network and seed
    eqprop study precision  [key=value ...]   16-bit relaxation against float32

`algorithms` trains through `eqprop.training.Trainer` with the `SquaredError` objective;
`cli` holds the command line of both.
"""
from .algorithms import ALL_RULES, DEFAULT_CONFIG, run_study, study_config, write_report

__all__ = ["ALL_RULES", "DEFAULT_CONFIG", "run_study", "study_config", "write_report"]
