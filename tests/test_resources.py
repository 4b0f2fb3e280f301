"""The data folders ship with the package; family specs name real mlx-lm architectures."""

from __future__ import annotations

from mlxlocal.models import supported_model_types
from mlxlocal.resources import builtin_dir, family_spec, family_specs


def test_family_specs_are_installed_and_valid():
    specs = family_specs()
    assert {"llama", "mistral", "qwen2", "gemma2", "phi3"} <= set(specs)
    supported = set(supported_model_types())
    for name, spec in specs.items():
        assert spec["model_type"] == name and name in supported
        assert spec["gguf_arch"] and isinstance(spec["lora_targets"], list)
        assert isinstance(spec["permute_qk"], bool)
    assert family_spec("no-such-family") is None


def test_recipes_folder_is_installed():
    assert builtin_dir("recipes").is_dir()
