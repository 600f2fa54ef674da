"""SpeechLM TTS trainer: the stages that run inside the pods."""
