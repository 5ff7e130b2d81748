"""Which kernels run the TE model's LayerNorm and RMSNorm: TransformerEngine's own, or cuDNN's.

TE decides per call, from one process-wide switch for the forward and one for the backward pass (its C API
``nvte_enable_cudnn_norm_fwd/bwd``, initialised from ``NVTE_NORM_FWD_USE_CUDNN``/``NVTE_NORM_BWD_USE_CUDNN``). For
hidden sizes without a tuned TE kernel (ESM-2 650M's 1280, for one) TE falls back to its general kernel, several
times slower than the memory traffic needs; cuDNN's kernels made the graphed 650M step 2.5% faster on an H100
(README, "Kernels of the memory-bound steps"). Because the switch is global, the TE models set it at the start of
every forward and before graph capture (`select_norm_kernel`, two C calls): two models in one process (the
benchmark's interleaved variants) each run their own choice, and a CUDA graph keeps the kernels chosen at capture.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

NORM_KERNELS = ("te", "cudnn")  # TE's LayerNorm/RMSNorm kernels, or cuDNN's (forward and backward alike)


def check_norm_kernel(norm_kernel: str) -> None:
    """Refuse a ``norm_kernel`` that is not one of ``NORM_KERNELS``."""
    if norm_kernel not in NORM_KERNELS:
        raise ValueError(f"norm_kernel must be one of {NORM_KERNELS}, got {norm_kernel!r}")


@functools.cache
def _norm_switches() -> tuple[Any, Any]:
    """TE's two C switches, from the core library TE itself loaded (imported here: this module loads on CPU too)."""
    from transformer_engine import common

    library = common._load_core_library()  # cached by TE: the handle its Python package already holds
    switches = (library.nvte_enable_cudnn_norm_fwd, library.nvte_enable_cudnn_norm_bwd)
    for switch in switches:
        switch.argtypes, switch.restype = [ctypes.c_bool], None
    return switches


def select_norm_kernel(norm_kernel: str) -> None:
    """Make TE's normalization calls from now on, forward and backward, run ``norm_kernel``'s kernels."""
    for switch in _norm_switches():
        switch(norm_kernel == "cudnn")
