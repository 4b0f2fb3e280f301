"""Checkpoint I/O: validated safetensors reading, restricted .bin reading, atomic sharded writing."""
