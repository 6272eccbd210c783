"""Checkpoints for exact resume: ``<out>/checkpoint/state.pt``, written atomically.

One file holds everything the rest of a run depends on: the trainer's modules (the model, and
PPO's value head), optimizer and scheduler states, every RNG state (the trainer's
``torch.Generator`` for data order and rollout seeds, torch's global CPU and CUDA generators
used by ``model.generate``, Python's and NumPy's), the step, the elapsed time and the metrics
rows so far. It is written to a temporary file in the same dir and moved into place with
``os.replace``, so a crash while saving leaves the previous checkpoint intact. A run resumed
from step k then computes the same parameters and metrics rows (except ``time``) as a run that
was never interrupted. The config must match the saved one (``steps`` and ``num_threads`` may
differ: a run may be extended).
"""
from __future__ import annotations

import dataclasses
import os
import random

import torch

FILE = "state.pt"
FREE_FIELDS = ("steps", "num_threads")  # may change between the saved run and the resumed one


def path_of(directory: str) -> str:
    return os.path.join(directory, FILE)


def exists(directory: str | None) -> bool:
    return directory is not None and os.path.isfile(path_of(directory))


def rng_states(generator: torch.Generator) -> dict:
    states = {"generator": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        states["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return states


def set_rng_states(states: dict, generator: torch.Generator) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy

        numpy.random.set_state(states["numpy"])


def _config_dict(config) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in FREE_FIELDS}


def save(trainer, generator: torch.Generator, directory: str) -> str:
    """Write the trainer's state (see the module docstring) to ``directory/state.pt``."""
    os.makedirs(directory, exist_ok=True)
    state = {
        "step": trainer.step,
        "config": _config_dict(trainer.config),
        "modules": {name: getattr(trainer, name).state_dict() for name in trainer.checkpoint_modules},
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "rng": rng_states(generator),
        "metrics": list(trainer.metrics.rows),
        "elapsed": trainer.metrics.elapsed(),
    }
    final = path_of(directory)
    tmp = f"{final}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, final)
    return final


def load(trainer, generator: torch.Generator, directory: str) -> None:
    """Restore ``save``'s state into a freshly built trainer (same starting model and config)."""
    if not exists(directory):
        raise FileNotFoundError(f"no checkpoint to resume from: {path_of(directory)} does not exist "
                                "(run without --resume to start from scratch)")
    state = torch.load(path_of(directory), map_location="cpu", weights_only=False)
    saved, now = state["config"], _config_dict(trainer.config)
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(f"the checkpoint in {directory} was written with another config (differs in: "
                         f"{', '.join(diff)}); resume with the same settings")
    for name in trainer.checkpoint_modules:
        getattr(trainer, name).load_state_dict(state["modules"][name])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"], generator)
    trainer.step = state["step"]
    trainer.metrics.restore(state["metrics"], state["elapsed"])
