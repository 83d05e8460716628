"""Checkpoints of the reference model: a folder with ``config.json`` (the :class:`ModelConfig`) and
``model.safetensors`` (the weights and the routers' balance biases)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from inference.config import ModelConfig
from inference.config import preset as get_preset
from inference.model import ReferenceNet

SHIPPED = Path(__file__).parent / "checkpoints" / "tiny"
"""The trained ``tiny`` checkpoint that ships with the repository: ``--model reference`` without ``--checkpoint``
(see ``inference/checkpoints/README.md``)."""
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT = "microturn-reference/1"


def save_checkpoint(net: ReferenceNet, out: Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``net`` into folder ``out`` (created if needed), its floating-point tensors as ``dtype`` (default:
    as they are; loading casts them back to the model's float32); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous().cpu()
             for k, v in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    (out / CONFIG).write_text(json.dumps({"format": FORMAT, "model": net.cfg.to_dict()}, indent=2) + "\n")
    return out


def load_config(path: Path) -> ModelConfig:
    data = json.loads((Path(path) / CONFIG).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint (format {data.get('format')!r})")
    return ModelConfig.from_dict(data["model"])


def load_checkpoint(path: Path, device: str = "cpu") -> ReferenceNet:
    """The model saved in folder ``path``, in eval mode on ``device``."""
    path = Path(path)
    net = ReferenceNet(load_config(path))
    net.load_state_dict(load_file(str(path / WEIGHTS), device="cpu"), strict=True)
    return net.to(device).eval()


def export_checkpoint(src: Path, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Copy the checkpoint in ``src`` to ``out`` with its weights stored as ``dtype`` (half the size in fp16)."""
    return save_checkpoint(load_checkpoint(src), out, dtype)


def init_checkpoint(preset: str, out: Path, seed: int = 0) -> Path:
    """A randomly initialised checkpoint of the named preset, written to ``out``."""
    torch.manual_seed(seed)
    return save_checkpoint(ReferenceNet(get_preset(preset)), out)
