"""Compatibility: ``lorakit.train.trainer`` was the whole job in one module; it is now a recipe in parts.

    job.py        run(), prepare(), launch_processes(): the parts built from the TrainConfig
    loop.py       the step loop (loop.fit)
    state.py      Trainer: the run's state and the pieces of one step, checkpoints and resume
    hooks.py      the per-step hooks (StepHook, step_hooks)
    evaluation.py evaluate(), held_out_change()
    run_dir.py    outputs: MetricsLog, plot_metrics, check_same_run, resume_command
    signals.py    StopOnSignal

The names below stay importable from here for callers of the old module.
"""

from lorakit.errors import ConfigError, LorakitError, TrainingError
from lorakit.train.config import DEFAULT_LR, DEFAULT_MAX_LENGTH, DEFAULT_STEPS, TrainConfig
from lorakit.train.evaluation import evaluate, format_metrics, held_out_change, loss_targets
from lorakit.train.hooks import StepHook
from lorakit.train.job import check_causal_lm_options, launch_processes, prepare, run
from lorakit.train.loop import fit
from lorakit.train.run_dir import MetricsLog, plot_metrics, resume_command
from lorakit.train.signals import StopOnSignal
from lorakit.train.state import Clock, LogWindow, MicroBatch, Trainer, linear_schedule

__all__ = [
    "Clock", "ConfigError", "DEFAULT_LR", "DEFAULT_MAX_LENGTH", "DEFAULT_STEPS", "LogWindow", "LorakitError",
    "MetricsLog", "MicroBatch", "StepHook", "StopOnSignal", "TrainConfig", "Trainer", "TrainingError",
    "check_causal_lm_options", "evaluate", "fit", "format_metrics", "held_out_change", "launch_processes",
    "linear_schedule", "loss_targets", "plot_metrics", "prepare", "resume_command", "run",
]
