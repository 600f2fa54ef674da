"""Reinforcement learning for the SpeechLM: GRPO (`grpo`) and its rewards (`rewards`)."""
