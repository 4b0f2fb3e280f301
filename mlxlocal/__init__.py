"""mlxlocal: convert, quantize, talk to and fine-tune language models locally with MLX."""

__version__ = "0.1.0"

from .convert import convert  # noqa: E402
from .errors import MlxLocalError  # noqa: E402
from .info import info  # noqa: E402

__all__ = ["MlxLocalError", "convert", "info", "__version__"]
