"""Fine-tuning: recipes run into adapters (LoRA, DoRA, QLoRA) or fully fine-tuned weights."""
