"""GRPO rewards: reward functions by name (the seed's names), rule checks, and the decode-once scorer.

The model-based rewards map the measures of `trainer.scoring` (ASR error rate, speaker similarity,
DNSMOS), which the eval harness reports too: one implementation.
"""

from trainer.rl.rewards.batch import RewardBatch
from trainer.rl.rewards.functions import REWARD_FUNCS, RewardFunc, ScorerModels, build_reward_funcs
from trainer.rl.rewards.scorer import RewardScorer, ScoreResult

__all__ = [
    "REWARD_FUNCS",
    "RewardBatch",
    "RewardFunc",
    "RewardScorer",
    "ScoreResult",
    "ScorerModels",
    "build_reward_funcs",
]
