"""PEFT interop, with PEFT itself as the reference: our adapters load in PeftModel and give our
logits; PEFT-written adapters load in mlx-lm through ours and give PEFT's; round trips are exact."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from helpers import make_adapter, mlx_logits, probe_ids

from mlxlocal import convert
from mlxlocal.errors import MlxLocalError
from mlxlocal.export.peft import export_peft, import_peft

TOL = 1e-4  # max |Δlogit| at float32; logits here have std > 0.5


@pytest.fixture(scope="module")
def base(checkpoints, tmp_path_factory):
    """(HF checkpoint, its MLX conversion) of the tiny Llama."""
    hf = checkpoints("llama")
    mlx_dir = tmp_path_factory.mktemp("peft") / "mlx"
    convert(hf, mlx_dir)
    return hf, mlx_dir


def peft_logits(hf_dir, peft_dir, ids):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(peft_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def peft_written(hf_dir, out, **config):
    """An adapter written by PEFT itself, with random weights (init_lora_weights=False)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    settings = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    peft_model = get_peft_model(model, LoraConfig(**settings))
    with torch.no_grad():  # DoRA: move the magnitudes away from the weight norms
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "kind,extra,keys",
    [
        ("lora", {}, None),
        ("lora", {"rslora": True}, ["self_attn.q_proj", "mlp.down_proj"]),
        ("dora", {}, ["self_attn.q_proj", "self_attn.v_proj"]),
    ],
    ids=["lora", "rslora", "dora"],
)
def test_export_loads_in_peft_with_our_logits(kind, extra, keys, base, tmp_path):
    hf, mlx_dir = base
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0, **extra}
    adapter = make_adapter(mlx_dir, tmp_path / "a", kind=kind, keys=keys, num_layers=1)
    if extra:  # rsLoRA is a training-time choice recorded next to the scale
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["lora_parameters"] = {**config["lora_parameters"], **params}
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = export_peft(adapter, tmp_path / "peft", base_model=str(hf))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1] and config["use_dora"] == (kind == "dora")
    expected_alpha = 2.0 * (math.sqrt(4) if extra else 4)
    assert config["lora_alpha"] == expected_alpha and config["use_rslora"] == bool(extra)
    ids = probe_ids()
    ours = mlx_logits(mlx_dir, ids, adapter)
    assert np.abs(ours - mlx_logits(mlx_dir, ids)).max() > 0.05  # the adapter changes things
    assert np.abs(peft_logits(hf, out, ids) - ours).max() <= TOL


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["q_proj", "v_proj", "gate_proj"]},
        {"target_modules": ["k_proj", "o_proj"], "use_rslora": True, "layers_to_transform": [1]},
        {"target_modules": ["q_proj", "up_proj"], "use_dora": True},
    ],
    ids=["lora", "rslora", "dora"],
)
def test_peft_written_adapter_imports_with_peft_logits(config, base, tmp_path):
    hf, mlx_dir = base
    src = peft_written(hf, tmp_path / "peft", **config)
    out = import_peft(src, tmp_path / "ours", mlx_dir)
    ids = probe_ids()
    reference = peft_logits(hf, src, ids)
    assert np.abs(reference - mlx_logits(mlx_dir, ids)).max() > 0.05
    assert np.abs(mlx_logits(mlx_dir, ids, out) - reference).max() <= TOL
    # `--adapter` takes the PEFT directory itself (imported on the fly).
    from mlxlocal.models import load

    model, _ = load(mlx_dir, adapter=src)
    assert np.abs(mlx_logits(model, ids) - reference).max() <= TOL


def _tensors(path, name):
    from safetensors.numpy import load_file

    return load_file(str(path / name))


def test_round_trips_are_exact(base, tmp_path):
    hf, mlx_dir = base
    ours = make_adapter(mlx_dir, tmp_path / "ours", kind="dora", scale=1.7, keys=["mlp.up_proj"])
    peft_dir = export_peft(ours, tmp_path / "peft")
    back = import_peft(peft_dir, tmp_path / "back", mlx_dir)
    a, b = _tensors(ours, "adapters.safetensors"), _tensors(back, "adapters.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    config = json.loads((back / "adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == 1.7 and config["fine_tune_type"] == "dora"

    src = peft_written(hf, tmp_path / "p0", target_modules=["q_proj"], use_rslora=True, r=8)
    again = export_peft(import_peft(src, tmp_path / "m0", mlx_dir), tmp_path / "p1")
    a = _tensors(src, "adapter_model.safetensors")
    b = _tensors(again, "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((again / "adapter_config.json").read_text())["lora_alpha"] == 8


def test_bad_peft_adapters_are_refused(base, tmp_path):
    hf, mlx_dir = base
    src = peft_written(hf, tmp_path / "p", target_modules=["q_proj"])
    config = json.loads((src / "adapter_config.json").read_text())
    cases = {
        "modules_to_save": {**config, "modules_to_save": ["lm_head"]},
        "target module 'c_attn'": {**config, "target_modules": ["q_proj", "c_attn"]},
        "peft_type": {**config, "peft_type": "IA3"},
    }
    for message, bad in cases.items():
        (src / "adapter_config.json").write_text(json.dumps(bad))
        with pytest.raises(MlxLocalError, match=message):
            import_peft(src, tmp_path / "out", mlx_dir)
        assert not (tmp_path / "out").exists()
    (src / "adapter_config.json").write_text(json.dumps(config))

    # Tensors for modules this model lacks (another architecture) or of another width.
    from safetensors.numpy import save_file

    tensors = _tensors(src, "adapter_model.safetensors")
    renamed = {k.replace("self_attn.q_proj", "attn.c_attn"): v for k, v in tensors.items()}
    (src / "adapter_config.json").write_text(json.dumps({**config, "target_modules": "c_attn"}))
    save_file(renamed, str(src / "adapter_model.safetensors"))
    with pytest.raises(MlxLocalError, match="another architecture"):
        import_peft(src, tmp_path / "out", mlx_dir)
    (src / "adapter_config.json").write_text(json.dumps(config))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    save_file(
        {**tensors, key: np.zeros((4, 32), np.float32)}, str(src / "adapter_model.safetensors")
    )
    with pytest.raises(MlxLocalError, match="another model size"):
        import_peft(src, tmp_path / "out", mlx_dir)
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_base_whose_config_the_weights_cannot_fill(base, tmp_path):
    """The written adapter's layer count comes from --model's config: a config claiming 10^7
    layers beside two (found by the hostile corpus: it wrote an adapter) is refused first."""
    hf, mlx_dir = base
    src = peft_written(hf, tmp_path / "p", target_modules=["q_proj"])
    model = shutil.copytree(mlx_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**7}))
    with pytest.raises(MlxLocalError, match="num_hidden_layers is 10000000 but the weight"):
        import_peft(src, tmp_path / "out", model)
    assert not (tmp_path / "out").exists()
