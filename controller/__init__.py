"""ttsctl: turns a pipeline spec into stage runs (local processes or PyTorchJobs)."""
