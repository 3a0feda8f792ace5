"""Retraining on Ray: feedback labels, validated datasets, Whisper fine-tuning, the evaluation
gate and drift-triggered jobs. (Issue 6; nothing here yet.)"""
