"""The names a user chooses from on the command line, defined once and importable without
loading the verbs that use them, so `mlxlocal --help` stays fast and loads no model code.
(Quantization modes and presets live in the equally light `quant_plan`.)"""

EVAL_TASKS = ("perplexity", "classify", "generate", "preference")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")  # GGML types `export gguf` writes
ON_ERROR = ("stop", "skip")  # what a bad batch record does: stop the run, or become an error line
