"""Checkpoint I/O: validated safetensors, restricted .bin reading, atomic sharded writing."""
