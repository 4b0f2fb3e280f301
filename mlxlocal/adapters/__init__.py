"""The one adapter format: LoRA/DoRA math, mlx-lm-layout and PEFT files, and the layers.

Sits just above `checkpoint/` and below `models.py`, because loading a model applies its
adapters in memory.
"""
