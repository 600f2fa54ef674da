"""Serving: export any checkpoint to a serving directory (`export`), synthesis (`synthesize`, `infer`)."""
