"""Builders for tiny, real Hugging Face checkpoints (transformers writes them) and references."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mlxlocal.tiny import write_tokenizer

if TYPE_CHECKING:
    import mlx.nn as nn

VOCAB = 512
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    rope_theta=50000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.15,
)
# Llama 3 rope scaling as transformers 5 writes it (rope_parameters), short enough to matter.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 50000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # mlx-lm ignores these sliding windows (convert warns): keep them beyond the probes.
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 128}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"query_pre_attn_scalar": 16, "sliding_window": 128, "tie_word_embeddings": True},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def make_hf_checkpoint(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny `arch` model with transformers (std 0.15 init) plus a local tokenizer.

    `safe=False` saves pytorch_model.bin; `shard="100KB"` shards the safetensors.
    """
    import torch
    import transformers

    safe = overrides.pop("safe", True)
    shard = overrides.pop("shard", None)
    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    if safe:
        model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    else:
        _save_bin(model, Path(out), two_shards=bool(shard))
    write_tokenizer(out, vocab_size=VOCAB)
    return Path(out)


def _save_bin(model, out: Path, two_shards: bool) -> None:
    """pytorch_model*.bin as older transformers wrote them (transformers 5 writes safetensors)."""
    import json

    import torch

    model.config.save_pretrained(out)
    state = model.state_dict()
    if not two_shards:
        torch.save(state, out / "pytorch_model.bin")
        return
    names = list(state)
    parts = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for file, keys in parts.items():
        torch.save({k: state[k] for k in keys}, out / file)
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def hf_logits(path: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def mlx_logits(
    model: nn.Module | Path | str, ids: list[int] | None = None, adapter: Path | None = None
) -> np.ndarray:
    """float32 logits of `ids` (default `probe_ids()`) from a loaded model, or from an MLX
    checkpoint (+ `adapter`) loaded by mlx-lm."""
    import mlx.core as mx

    if isinstance(model, (str, Path)):
        from mlx_lm import load

        model, _ = load(str(model), adapter_path=str(adapter) if adapter else None)
    ids = probe_ids() if ids is None else ids
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def probe_ids(n: int = 24, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, n).tolist()


# A run with every piece of state a checkpoint must carry: warmup + cosine, clipping, rotation.
SCHEDULED_RUN = {
    "training__schedule": "cosine",
    "training__warmup_steps": 2,
    "training__grad_clip": 1.0,
    "checkpoint__keep": 2,
}


def compiling_env() -> dict[str, str]:
    """The environment for a child process that compiles, as users' runs do (see `compiled`)."""
    return {k: v for k, v in os.environ.items() if k != "MLX_DISABLE_COMPILE"}


# The `mlxlocal` command in a child process (this interpreter, whatever is on PATH).
CLI = [
    sys.executable,
    "-c",
    "import sys; from mlxlocal.cli import main; sys.argv[0] = 'mlxlocal'; main()",
]


def run_cli(*args, **env) -> subprocess.CompletedProcess:
    """The CLI in a child that compiles its training step, as users' runs do."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env={**compiling_env(), **env}
    )


def finished_run(recipe: Path, run: Path | None = None, *args: str) -> subprocess.CompletedProcess:
    """`mlxlocal run RECIPE [output=RUN] ARGS…` in a child (see `run_cli`), which must succeed."""
    done = run_cli("run", str(recipe), *([f"output={run}"] if run else []), *args)
    assert done.returncode == 0, done.stderr
    return done


def uninterrupted_run(recipe: Path) -> Path:
    """The reference a stopped run of `recipe` is compared with: it, run to the end once (in
    `recipe`'s folder)."""
    run = recipe.parent / "uninterrupted"
    if not (run / "summary.json").exists():
        finished_run(recipe, run)
    return run


# Runs the real CLI in a child that SIGKILLs itself at a chosen moment of step KILL_AT.
KILLER = """
import os, signal, sys
from mlxlocal.train import checkpoints

kill_at, moment = int(os.environ["KILL_AT"]), os.environ["KILL_MOMENT"]
write_adapters, log = checkpoints.save_adapters, checkpoints.RunDir.log

def mid_checkpoint(model, out, config):  # step-N/ is half-written when this kill lands
    write_adapters(model, out, config)
    if f"step-{kill_at}." in out.name:
        os.kill(os.getpid(), signal.SIGKILL)

def after_step(self, record):
    log(self, record)
    if record["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

if moment == "mid-checkpoint":
    checkpoints.save_adapters = mid_checkpoint
else:
    checkpoints.RunDir.log = after_step
from mlxlocal.cli import main
sys.argv = ["mlxlocal", *sys.argv[1:]]
main()
"""


def killed_run(recipe: Path, run: Path, kill_at: int, moment: str = "after-step") -> None:
    """`mlxlocal run RECIPE output=RUN` SIGKILLed at `moment` of step `kill_at`: after it
    (its metrics line written) or while its checkpoint is half-written (`mid-checkpoint`)."""
    env = {**compiling_env(), "KILL_AT": str(kill_at), "KILL_MOMENT": moment}
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, "run", str(recipe), f"output={run}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr


def read_metrics(run: Path) -> list[dict]:
    """A run directory's metrics.jsonl, one dict per step."""
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(expected: Path, got: Path, steps: int) -> None:
    """Run `got` trained as `expected` did: losses, rates and tokens per step, final adapters."""
    import mlx.core as mx
    import pytest

    theirs, ours = read_metrics(expected), read_metrics(got)
    assert [m["step"] for m in ours] == list(range(1, steps + 1))
    for a, b in zip(theirs, ours, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), f"step {b['step']}"
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], abs=1e-12)
        assert b["trained_tokens"] == a["trained_tokens"]
    final = mx.load(str(got / "adapters" / "adapters.safetensors"))
    for name, value in mx.load(str(expected / "adapters" / "adapters.safetensors")).items():
        np.testing.assert_allclose(np.array(final[name]), np.array(value), atol=1e-6)


def write_recipe(folder: Path, model: Path, **overrides) -> Path:
    """A small, fast training recipe in `folder` (run dir `folder/run`); `a__b=v` sets a.b."""
    import yaml

    recipe = {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": "builtin:tiny-chat.jsonl", "max_length": 128},
        "method": {"type": "lora", "rank": 4, "alpha": 8},
        "training": {"learning_rate": 2e-3, "batch_size": 4, "steps": 6},
        "output": str(folder / "run"),
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            recipe.setdefault(section, {})[name] = value
        else:
            recipe[key] = value
    path = Path(folder) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def make_adapter(model_dir, out, kind="lora", rank=4, scale=2.0, num_layers=2, keys=None, **extra):
    """An adapter in mlx-lm's layout with random (non-zero) lora_b and, for DoRA, magnitudes."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_dir))
    params = {"rank": rank, "scale": scale, "dropout": 0.0, **({"keys": keys} if keys else {})}
    linear_to_lora_layers(model, num_layers, params, use_dora=kind == "dora")
    mx.random.seed(3)
    tensors = {}
    for name, value in tree_flatten(model.parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "lora_a":
            tensors[name] = value
        elif leaf == "lora_b":
            tensors[name] = mx.random.normal(value.shape) * 0.2
        elif leaf == "m":
            tensors[name] = value * (1 + 0.2 * mx.random.normal(value.shape))
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), tensors)
    config = {"fine_tune_type": kind, "num_layers": num_layers, "lora_parameters": params}
    (out / "adapter_config.json").write_text(json.dumps({**config, **extra}))
    return out


def sentencepiece_checkpoint(hf: Path, out: Path) -> Path:
    """The tiny Llama with a SentencePiece tokenizer (BPE + byte fallback, as Llama 2's)."""
    import io
    import json
    import shutil

    import sentencepiece as spm

    from mlxlocal.tiny import CORPUS

    shutil.copytree(hf, out)
    (out / "tokenizer.json").unlink()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 20),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    settings = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "legacy": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(settings))
    return out


PROMPT = "The quick brown fox"
PROMPTS = [PROMPT, "Convert the checkpoint", "A local model", "Questions and answers", "def add"]


def rig_end_of_turn(folder: Path, end: int, at: int = 3) -> str:
    """Swap two output rows of an MLX checkpoint so that greedy decoding gives `end` as token
    `at`; the prompt. A model whose output layer is its embedding (tied) first gets an untied
    copy, so that the prompt's embeddings stay as they were.

    The first prompt whose tokens up to `at` hold no stop id (a random model may well begin
    with EOS) is taken.
    """
    import json

    import mlx.core as mx

    from mlxlocal.generate import generate, load_model

    lm = load_model(folder)
    for prompt in PROMPTS:
        tokens = generate(lm, prompt, max_tokens=at + 1, ignore_eos=True).tokens
        if end not in tokens and tokens[at] not in tokens[:at] and not set(tokens) & lm.stop_ids:
            break
    else:
        raise AssertionError(f"no prompt to rig {folder.name} with")
    file = folder / "model.safetensors"
    weights = mx.load(str(file))
    if "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        for name in ("config.json", "model.safetensors.index.json"):
            if (folder / name).exists():
                data = json.loads((folder / name).read_text())
                if name == "config.json":
                    data["tie_word_embeddings"] = False
                else:
                    data["weight_map"]["lm_head.weight"] = file.name
                (folder / name).write_text(json.dumps(data))
    head = np.array(weights["lm_head.weight"])
    head[[end, tokens[at]]] = head[[tokens[at], end]]
    weights["lm_head.weight"] = mx.array(head)
    mx.save_safetensors(str(file), weights, metadata={"format": "mlx"})
    return prompt
