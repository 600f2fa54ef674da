"""SFT of the SpeechLM: the objective, the loop, parallel strategies, checkpoints, telemetry."""
