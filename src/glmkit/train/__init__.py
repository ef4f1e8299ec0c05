"""Fine-tuning: data formats and label masks, settings, methods (LoRA, P-Tuning v2, freeze, full), the
training loop, evaluation and metrics, export."""
