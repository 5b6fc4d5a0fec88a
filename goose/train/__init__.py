"""Training: data loading, the training loop, LoRA and state tuning."""
