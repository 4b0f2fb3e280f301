"""`export peft ADAPTERS OUT` and `import peft PEFT_DIR OUT --model M`: PEFT adapters out and in.

The layouts and their mapping live in `mlxlocal.adapters`; these verbs check and write
atomically.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters.files import check_fits, header_shapes, linear_shapes, write_adapter
from ..adapters.peft import check_targets, read_any, read_peft, write_peft
from ..checkpoint.atomic import atomic_directory, check_output
from ..models import check_config_sizes, read_config


def export_peft(
    adapters: str | Path, out: str | Path, *, base_model: str | None = None, force: bool = False
) -> Path:
    """Write an adapter (mlx-lm layout) as a PEFT directory that PeftModel.from_pretrained loads."""
    out = Path(out)
    check_output(out, force)
    adapter = read_any(adapters)
    with atomic_directory(out, force) as tmp:
        write_peft(adapter, tmp, base_model)
    return out


def import_peft(
    peft_dir: str | Path, out: str | Path, model: str | Path, *, force: bool = False
) -> Path:
    """Write a PEFT adapter in mlx-lm's layout for the MLX checkpoint `model`, checking it fits."""
    out, model = Path(out), Path(model)
    check_output(out, force)
    adapter = read_peft(peft_dir)
    config = read_config(model)
    # The adapter's layer count is written from the config: bound it by what the files hold.
    check_config_sizes(config, header_shapes(model))
    shapes = linear_shapes(model, config)
    check_targets(adapter, shapes, str(peft_dir), f"{model} ({config['model_type']})")
    check_fits(adapter, shapes, model)
    adapter.block_layout()  # refuses modules outside the transformer layers before writing
    extra = {"model": str(model), "source": str(peft_dir)}
    with atomic_directory(out, force) as tmp:
        write_adapter(adapter, tmp, config["num_hidden_layers"], extra)
    return out
