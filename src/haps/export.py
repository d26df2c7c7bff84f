"""Export a generated adapter as a PEFT LoRA folder, loadable with ``PeftModel.from_pretrained``.

Naming: haps' update is ``W + alpha * A @ B`` with A (d_out, r) and B (r, d_in); PEFT's is
``W + (lora_alpha / r) * lora_B @ lora_A``. So PEFT's ``lora_A.weight`` (r, d_in) is haps' B, PEFT's
``lora_B.weight`` (d_out, r) is haps' A, and ``lora_alpha = alpha * r`` makes PEFT's scale equal haps' alpha
(``use_rslora`` off). Layers: ``layers_to_transform`` lists the adapted decoder layers (``layers_pattern``
"layers"); ``target_modules`` is the projection's name inside a layer (e.g. ``self_attn.o_proj``).
"""

from __future__ import annotations

import json
from pathlib import Path

from haps.config import LoraTarget
from haps.files import atomic_dir
from haps.models.lora import LoraSites
from haps.models.types import RowAdapter


def peft_files(adapter: RowAdapter, sites: LoraSites, target: LoraTarget, base_model: str,
               prefix: str = "base_model.model.model.layers") -> tuple[dict, dict]:
    """(adapter_config.json content, {safetensors key: tensor}) for ``adapter`` at ``sites``."""
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": target.rank, "lora_alpha": target.alpha * target.rank, "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "fan_in_fan_out": False, "target_modules": [target.module_name],
        "layers_to_transform": list(sites.layers), "layers_pattern": "layers", "inference_mode": True,
    }
    tensors = {}
    for layer, A, B in zip(sites.layers, adapter.A, adapter.B, strict=True):
        key = f"{prefix}.{layer}.{target.module_name}"
        tensors[f"{key}.lora_A.weight"] = B.detach().float().contiguous()  # (r, d_in): haps' B
        tensors[f"{key}.lora_B.weight"] = A.detach().float().contiguous()  # (d_out, r): haps' A
    return config, tensors


def write_peft_adapter(adapter: RowAdapter, sites: LoraSites, target: LoraTarget, base_model: str,
                       out: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to the folder ``out`` (atomically)."""
    from safetensors.torch import save_file

    config, tensors = peft_files(adapter, sites, target, base_model)
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
    return out
