"""The trainer: ``run(config, workdir)`` trains (or resumes) a (MoE) transformer LM.

``config`` (the one schema, defaults and checks), ``state`` (``setup(config)``: model, optimizer and
their shards), ``step`` (the jitted update and evaluation steps), ``evaluate`` (what is measured),
``loop`` (``run``), ``workdir`` (lock, config of record, processes), ``checkpoint``,
``metrics_writer`` and ``plots`` (what a run leaves behind).
"""

from moejax.trainer.config import complete_config, default_config, get_tokenizer, make_model_config
from moejax.trainer.loop import run
from moejax.trainer.state import TrainSetup, setup

__all__ = ["TrainSetup", "complete_config", "default_config", "get_tokenizer", "make_model_config",
           "run", "setup"]
