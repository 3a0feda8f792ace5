"""Turning model files from elsewhere into transformers Whisper checkpoints we can publish."""
