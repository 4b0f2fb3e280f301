"""mlxlocal: convert, quantize, talk to and fine-tune language models locally with MLX."""

__version__ = "0.1.0"

from .batch import batch  # noqa: E402
from .convert import convert  # noqa: E402
from .errors import MlxLocalError  # noqa: E402
from .generate import Sampling, generate, load_model, stream  # noqa: E402
from .info import info  # noqa: E402
from .quantize import quantize  # noqa: E402

__all__ = [
    "MlxLocalError",
    "Sampling",
    "batch",
    "convert",
    "generate",
    "info",
    "load_model",
    "quantize",
    "stream",
    "__version__",
]
