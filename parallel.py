"""Strategy-neutral pieces the parallelism entrypoints share (`train_ddp.py`, `train_fsdp2.py`, `train_mfsdp.py`).

Everything here works the same whatever wraps the model; what differs between strategies stays in their entrypoint.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from model import transformer_layers


def use_torch_compile(cfg: Any) -> bool:
    """The `use_torch_compile` switch (off unless set, so configurations written before it existed still run)."""
    return bool(cfg.get("use_torch_compile", False))


def compile_transformer_layers(model: nn.Module) -> None:
    """`torch.compile` each transformer layer in place, before the strategy wraps the model.

    Compiling the repeated block rather than the whole model keeps the strategy's own hooks (DDP's gradient buckets,
    FSDP's all-gathers) outside the compiled graphs, and all layers share one compiled graph, so compile time does
    not grow with depth.
    """
    for layer in transformer_layers(model):
        layer.compile()
