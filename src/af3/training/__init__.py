"""Fine-tuning: data, stages, trainer."""
