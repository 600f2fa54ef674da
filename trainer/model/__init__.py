"""The SpeechLM: audio-token vocabulary, prompt formats, model build/save/load, packed attention."""
