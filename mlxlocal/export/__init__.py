"""Getting models and adapters out to other runtimes (llama.cpp/Ollama GGUF, PEFT) and back."""
