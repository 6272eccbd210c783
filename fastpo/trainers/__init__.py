"""Thin trainers on fastpo's fused linear losses and Hugging Face causal LMs (CPU-friendly).

Each trainer is one readable file: ``SFTTrainer`` (sft.py), ``RewardTrainer`` (reward.py),
``PPOTrainer`` (ppo.py), ``GRPOTrainer`` (grpo.py), ``DPOTrainer`` (dpo.py). The embedded
default (``default_model.py``, ``addition.py``) is a character tokenizer, a 130k-parameter Llama
and two-digit addition with a sloppy demonstrator; ``fastpo train`` (pipeline.py) runs it.
Shared pieces: the loop (common.py), checkpoints and exact resume (checkpoint.py), data parallel
under torchrun (distributed.py), curves.png (curves.py), the progress bar (progress.py).
Needs ``pip install 'fastpo[train]'``.
"""
from . import addition, checkpoint
from .addition import addition_reward, demonstrations, evaluate, prompts
from .default_model import build_model, build_tokenizer
from .dpo import DPOConfig, DPOTrainer, sample_preference_pairs
from .grpo import GRPOConfig, GRPOTrainer
from .pipeline import STAGES, run_stage
from .ppo import PPOConfig, PPOTrainer
from .reward import RewardConfig, RewardModelScorer, RewardTrainer, reward_model_from
from .sft import SFTConfig, SFTTrainer

__all__ = [
    "DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer", "PPOConfig", "PPOTrainer", "RewardConfig",
    "RewardModelScorer", "RewardTrainer", "SFTConfig", "SFTTrainer", "STAGES", "reward_model_from",
    "addition_reward", "build_model", "build_tokenizer", "demonstrations", "evaluate", "prompts",
    "run_stage", "sample_preference_pairs",
]
