"""Fine-tuning: data formats and tokenization with label masks, evaluation, metrics."""
