"""Training stages for mmfusion: ViT pretraining and VQA / caption fine-tuning, driven by accelerate."""
