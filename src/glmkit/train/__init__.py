"""Fine-tuning: settings, methods (LoRA, P-Tuning v2, freeze, full), the training loop, export."""
