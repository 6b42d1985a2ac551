"""Training: the optimizers (`bp.optim`), learning-rate schedules (`bp.schedules`), parameter
initializers, and the `fit`/`evaluate`/`predict` loop behind `CompiledModel.fit`. None of it
needs SymPy at module level except the optimizers' update formulas."""

from .fit import evaluate, fit, predict
from .init import INITIALIZERS, check_init, initial_value
from .optim import OPTIMIZERS, SGD, Adam, AdamW, Optimizer, RMSprop, from_config
from .schedules import SCHEDULES, Schedule, as_schedule, schedule_from_config

__all__ = ["evaluate", "fit", "predict", "INITIALIZERS", "check_init", "initial_value", "OPTIMIZERS", "SGD", "Adam",
           "AdamW", "Optimizer", "RMSprop", "from_config", "SCHEDULES", "Schedule", "as_schedule",
           "schedule_from_config"]
