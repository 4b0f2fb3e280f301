"""Checkpoint I/O: validated safetensors, restricted .bin reading, GGUF (blocks, tensor names,
tokenizer), atomic sharded writing, and a checkpoint folder's files and dtypes."""
