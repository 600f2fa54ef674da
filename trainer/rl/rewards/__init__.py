"""GRPO rewards and the scorers behind them (ASR error rate, speaker similarity, DNSMOS, rule checks).

The scorer modules (`asr`, `speaker`, `quality`) are also the eval harness's metrics: one implementation.
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
