"""Speech scoring, the one implementation behind the GRPO rewards (trainer/rl/rewards) and the eval
harness (trainer/eval): ASR error rates (`asr`), speaker similarity and the reference-embedding cache
(`speaker`), DNSMOS (`quality`), batched scoring of clips and its aggregate (`scorers`), and codec
resynthesis scoring (`resynthesis`, also run during codec training). Scorer models load from local paths
or fsspec URLs only (`model_files`)."""
