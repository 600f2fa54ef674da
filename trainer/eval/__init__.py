"""Offline evaluation: Seed-TTS-eval-style harness and its HTML report."""
