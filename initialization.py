"""Initial weights by the model family's rule: one rule for both implementations, the same on any number of ranks.

ESM-2 (transformers' `EsmPreTrainedModel._init_weights`): linear and embedding weights ~ N(0, initializer_range),
output projections included (no depth scaling); biases 0; LayerNorm weights 1; the padding-token row of the word
embeddings, and the rows past the real vocabulary that the TE model pads for tensor cores, 0.
AMPLIFY (`modeling_amplify_te.NVAmplifyForMaskedLM.init_weights`): the same but uniform, embeddings
U(±embedding_init_range) and every other weight U(±decoder_init_range); RMSNorm weights 1.

Sharded parameters are drawn whole on every rank from the identically seeded global generator, and each rank keeps
its own shard. DTensor's own random ops do not promise that: on GPU each shard gets a different part of the random
stream depending on how many shards there are, and on CPU every rank draws the same numbers for its shard.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from families import model_family


@torch.no_grad()
def _fill_as_unsharded(param: torch.Tensor, fill: Callable[[torch.Tensor], Any]) -> None:
    """Apply `fill` to the whole tensor and keep this rank's shard: values independent of the number of ranks."""
    if not isinstance(param, DTensor):
        fill(param)
        return
    local = param.to_local()
    full = torch.empty(param.shape, dtype=local.dtype, device=local.device)
    fill(full)
    local.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())


def normal_init_(param: torch.Tensor, std: float) -> None:
    """Fill `param` from N(0, std) with the values it would get unsharded, whatever the number of ranks."""
    _fill_as_unsharded(param, lambda full: full.normal_(mean=0.0, std=std))


NOT_AN_EMBEDDING = object()  # `init_parameter_`'s marker for a parameter that is no word-embedding table


def embedding_paddings(model: nn.Module) -> dict[int, int | None]:
    """The id of every embedding table (also where it is tied into the LM decoder) and its padding row."""
    return {id(m.weight): m.padding_idx for m in model.modules() if isinstance(m, nn.Embedding)}


def _is_norm_weight(module: nn.Module, name: str) -> bool:
    """TE's fused norm weights, torch's LayerNorm and AMPLIFY's RMSNorm: all start at 1."""
    if name == "layer_norm_weight":
        return True
    return name == "weight" and (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"))


@torch.no_grad()
def init_parameter_(module: nn.Module, name: str, param: torch.Tensor, config: Any, padding: Any) -> None:
    """Initialise one parameter that `module` holds as `name` by its family's rule (module docstring).

    `padding`: the table's padding row (or None) when `param` is a word-embedding table, else `NOT_AN_EMBEDDING`.
    It is given by the parameter's identity rather than read off `module`, because the LM decoder holds the tied
    embedding table too.
    """
    amplify = model_family(config) == "amplify"
    if _is_norm_weight(module, name):
        param.fill_(1.0)
    elif name.endswith("bias"):
        param.zero_()
    elif padding is not NOT_AN_EMBEDDING:
        draw = _uniform_draw(config.embedding_init_range) if amplify else _normal_draw(config.initializer_range)
        _fill_as_unsharded(param, functools.partial(_embedding_rows, draw, config.vocab_size, padding))
    elif amplify:
        _fill_as_unsharded(param, _uniform_draw(config.decoder_init_range))
    else:
        normal_init_(param, config.initializer_range)


def _normal_draw(std: float) -> Callable[[torch.Tensor], Any]:
    return lambda full: full.normal_(mean=0.0, std=std)


def _uniform_draw(bound: float) -> Callable[[torch.Tensor], Any]:
    return lambda full: full.uniform_(-bound, bound)


def _embedding_rows(
    draw: Callable[[torch.Tensor], Any], vocab_size: int, padding_idx: int | None, full: torch.Tensor
) -> None:
    draw(full)
    full[vocab_size:] = 0.0
    if padding_idx is not None:
        full[padding_idx] = 0.0


def _reset_owned_parameters(
    module: nn.Module,
    originals: dict[str, nn.Parameter],
    holders: dict[int, list[tuple[nn.Module, str]]],
    paddings: dict[int, int | None],
    config: Any,
) -> None:
    """`module.reset_parameters` while a framework materialises it: the family's rule, then re-tie shared weights.

    `to_empty` replaced `module`'s Parameters, so a weight it shares with other modules (the LM decoder tied to the
    word embeddings) is looked up by its original identity and handed to the others again.
    """
    for name, param in module.named_parameters(recurse=False):
        original = id(originals[name])
        init_parameter_(module, name, param, config, paddings.get(original, NOT_AN_EMBEDDING))
        for holder, attribute in holders[original]:
            if holder is not module:
                setattr(holder, attribute, param)


@contextlib.contextmanager
def esm2_init_on_materialisation(model: nn.Module, device: torch.device) -> Iterator[None]:
    """While a framework materialises a meta-device model one module at a time, make it produce its family's weights.

    Megatron-FSDP (`init_model_with_meta_device=True`) allocates one module that owns parameters at a time: its
    `to_empty`, its `reset_parameters()`, then a copy into this rank's shard, so no more than one module is ever
    whole on the GPU. Every rank draws the same numbers (same seed, same order), so the shards add up to one model.
    TransformerEngine modules initialise themselves with the init_method the TE model gives them; torch's own modules
    would use torch's defaults (Kaiming, N(0, 1) embeddings) and the LM head's bias has no `reset_parameters` at
    all, so those get the family's rule (ESM-2's or AMPLIFY's) for the duration. The TE AMPLIFY's decoder is a TE
    module: its uniform init_method also fills the padded vocabulary rows, whose logits are sliced off unused.
    Buffers are left alone by the framework, so they are allocated and filled here first, by the model's own
    `init_weights()` (a no-op on the meta parameters).
    """
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                setattr(module, name, torch.empty_like(buffer, device=device))
    model.init_weights()
    holders: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            holders[id(param)].append((module, name))
    patched = [
        module
        for module in model.modules()
        if not type(module).__module__.startswith("transformer_engine")
        and next(module.parameters(recurse=False), None) is not None
    ]
    paddings = embedding_paddings(model)
    for module in patched:
        originals = dict(module.named_parameters(recurse=False))
        module.reset_parameters = functools.partial(
            _reset_owned_parameters, module, originals, holders, paddings, model.config
        )
    try:
        yield
    finally:
        for module in patched:
            del module.reset_parameters
