"""Preference objectives (DPO, ORPO, SimPO) against TRL itself, and the preference data format.

Reference: TRL 1.16.0 on CPU torch 2.13, float32, the tiny Llama of `checkpoints("llama")` with
LoRA r=4, lora_alpha=8 on q_proj and v_proj (random A and B: init_lora_weights=False), the same
token ids on both sides: 2 pairs, right-padded, completion masks on the answers.
- DPO: `DPOTrainer._compute_loss` of a real trainer (loss_type ["sigmoid"], beta 0.3; the
  reference is TRL's own: the PEFT model with its adapters disabled).
- ORPO: `ORPOTrainer.odds_ratio_loss` (beta 0.2) with TRL's `get_batch_logps` (averaged) and
  the chosen rows' cross-entropy over prompt and answer, as `concatenated_forward` computes it.
- SimPO: `CPOTrainer.cpo_loss` with loss_type "simpo", beta 2.0, simpo_gamma 0.5,
  label_smoothing 0.1, cpo_alpha 0 (no NLL term).
Loss and mean rewards equal TRL's within 1e-4, adapter gradients within 1e-4 relative.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxlocal.train.preference import Objective, batch_loss

TOL = 1e-4
# Two pairs: prompt, chosen answer, rejected answer (token ids of the tiny 512-token vocab).
PAIRS = [
    ([5, 17, 33, 41], [71, 88, 90], [100, 101]),
    ([9, 12, 250, 7, 8], [300, 301, 302, 303], [400, 2]),
]


def _rows():
    """(input_ids, attention_mask, completion_mask) as TRL's DPO collator lays them out:
    every chosen row, then every rejected row, right-padded with 0."""
    rows = [p + c for p, c, _ in PAIRS] + [p + r for p, _, r in PAIRS]
    masks = [[0] * len(p) + [1] * len(c) for p, c, _ in PAIRS]
    masks += [[0] * len(p) + [1] * len(r) for p, _, r in PAIRS]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    att, comp = np.zeros_like(ids), np.zeros_like(ids)
    for i, (row, mask) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(row)], att[i, : len(row)], comp[i, : len(row)] = row, 1, mask
    return ids, att, comp


@pytest.fixture(scope="module")
def trl_dpo(checkpoints, mlx_checkpoints, tmp_path_factory):
    """A TRL DPOTrainer over the tiny Llama with fresh random LoRA adapters, and the same
    adapters imported into our layout (PEFT → mlx-lm mapping of mlxlocal.export.peft)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from mlxlocal.export.peft import import_peft

    hf, mlx_dir = checkpoints("llama"), mlx_checkpoints("llama")
    tmp = tmp_path_factory.mktemp("trl")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    lora = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]
    )
    args = DPOConfig(output_dir=str(tmp / "out"), beta=0.3, report_to=[], use_cpu=True)
    data = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(hf),
        peft_config=lora,
    )
    trainer.model.save_pretrained(tmp / "peft")
    ours = import_peft(tmp / "peft", tmp / "ours", mlx_dir)
    return trainer, mlx_dir, ours


def _our_model(mlx_dir, adapter_dir):
    from mlxlocal.adapters.layers import add_adapters
    from mlxlocal.models import load

    model, _ = load(mlx_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    keys = config["lora_parameters"]["keys"]
    add_adapters(model, "lora", 4, 2.0, 0.0, keys, list(range(len(model.layers))))
    model.load_weights(str(adapter_dir / "adapters.safetensors"), strict=False)
    mx.eval(model.parameters())
    return model


def _ours(model, objective, reference=None):
    """(loss, mean chosen reward, mean rejected reward, adapter gradients) of our step."""
    ids, att, comp = _rows()
    tokens, weights = mx.array(ids.astype(np.int32)), mx.array(comp.astype(np.float32))
    segments = mx.array(att.astype(np.int32))
    ref = mx.zeros((ids.shape[0],)) if reference is None else mx.array(reference)

    def loss(*arrays):
        total, pairs, sums = batch_loss(model, objective, *arrays)
        return total / pairs, sums / pairs

    (value, sums), grads = nn.value_and_grad(model, loss)(tokens, weights, segments, ref)
    return value.item(), np.array(sums), dict(tree_flatten(grads))


def _torch_grads(peft_model) -> dict[str, np.ndarray]:
    """PEFT's adapter gradients under our names (lora_a = Aᵀ, lora_b = Bᵀ)."""
    out = {}
    for name, p in peft_model.named_parameters():
        if "lora_" in name and p.grad is not None:
            ours = name.replace("base_model.model.", "").replace(".default.weight", "")
            ours = ours.replace("lora_A", "lora_a").replace("lora_B", "lora_b")
            out[ours] = p.grad.detach().numpy().T
            p.grad = None
    return out


def _same_grads(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs) and ours
    for name, g in theirs.items():
        diff = np.abs(np.array(ours[name]) - g).max()
        assert diff <= TOL * max(np.abs(g).max(), 1e-6), (name, diff)


def _reference_logps(trainer, ids, att, comp):
    """The base's summed answer log-probs (TRL's reference: adapters disabled)."""
    import torch

    model = trainer.model
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(att)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    picked = logp.gather(-1, torch.tensor(ids)[:, 1:, None])[..., 0]
    return (picked * torch.tensor(comp)[:, 1:]).sum(-1).numpy()


def test_dpo_matches_trl(trl_dpo):
    import torch

    trainer, mlx_dir, adapter = trl_dpo
    ids, att, comp = _rows()
    trainer.model.train()
    inputs = {k: torch.tensor(v) for k, v in (("input_ids", ids), ("attention_mask", att))}
    inputs["completion_mask"] = torch.tensor(comp)
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, inputs, False)
    loss.backward()
    theirs = _torch_grads(trainer.model)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    reference = _reference_logps(trainer, ids, att, comp)
    model = _our_model(mlx_dir, adapter)
    value, sums, grads = _ours(model, Objective("dpo", beta=0.3), reference)
    assert abs(value - loss.item()) <= TOL
    assert abs(sums[0] - metrics["rewards/chosen"]) <= TOL
    assert abs(sums[1] - metrics["rewards/rejected"]) <= TOL
    assert abs(sums[2] - metrics["rewards/margins"]) <= TOL
    assert sums[3] == pytest.approx(metrics["rewards/accuracies"])
    assert abs(metrics["rewards/margins"]) > 1e-3  # the adapters really moved the policy
    _same_grads(grads, theirs)


def _policy_logps(peft_model, average: bool):
    """TRL's get_batch_logps of the PEFT model's logits (labels -100 outside the answers)."""
    import torch
    from trl.experimental.orpo import ORPOTrainer

    ids, att, comp = _rows()
    peft_model.train()
    logits = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(att)).logits
    labels = torch.where(torch.tensor(comp) == 1, torch.tensor(ids), -100)
    return logits, ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)


def _accelerator():
    import torch

    return SimpleNamespace(device=torch.device("cpu"))


def test_orpo_matches_trl(trl_dpo):
    import torch
    from trl.experimental.orpo import ORPOTrainer

    trainer, mlx_dir, adapter = trl_dpo
    ids, att, _ = _rows()
    logits, logps = _policy_logps(trainer.model, average=True)
    b = len(PAIRS)
    fake = SimpleNamespace(beta=0.2, accelerator=_accelerator())
    losses, chosen, rejected, *_ = ORPOTrainer.odds_ratio_loss(fake, logps[:b], logps[b:])
    # concatenated_forward's chosen NLL: every non-pad token of the chosen rows.
    labels = torch.where(torch.tensor(att) == 1, torch.tensor(ids), -100)[:b, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:b, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1)
    )
    loss = nll - losses.mean()
    loss.backward()
    theirs = _torch_grads(trainer.model)

    value, sums, grads = _ours(_our_model(mlx_dir, adapter), Objective("orpo", beta=0.2))
    assert abs(value - loss.item()) <= TOL
    assert abs(sums[0] - chosen.mean().item()) <= TOL
    assert abs(sums[1] - rejected.mean().item()) <= TOL
    _same_grads(grads, theirs)


def test_simpo_matches_trl(trl_dpo):
    from trl.experimental.cpo import CPOTrainer

    trainer, mlx_dir, adapter = trl_dpo
    _, logps = _policy_logps(trainer.model, average=True)
    b = len(PAIRS)
    fake = SimpleNamespace(
        beta=2.0,
        simpo_gamma=0.5,
        label_smoothing=0.1,
        loss_type="simpo",
        alpha=0.0,
        cpo_alpha=0.0,
        accelerator=_accelerator(),
    )
    losses, chosen, rejected = CPOTrainer.cpo_loss(fake, logps[:b], logps[b:])
    loss = losses.mean()
    loss.backward()
    theirs = _torch_grads(trainer.model)

    objective = Objective("simpo", beta=2.0, label_smoothing=0.1, simpo_gamma=0.5)
    value, sums, grads = _ours(_our_model(mlx_dir, adapter), objective)
    assert abs(value - loss.item()) <= TOL
    assert abs(sums[0] - chosen.mean().item()) <= TOL
    assert abs(sums[1] - rejected.mean().item()) <= TOL
    _same_grads(grads, theirs)
