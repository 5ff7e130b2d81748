"""Choose and build the model (ESM-2 or AMPLIFY): the TransformerEngine one where it can run, else the reference.

The family comes from config.json's `model_type`: "esm"/"nv_esm" is ESM-2 (reference: transformers' EsmForMaskedLM),
"AMPLIFY"/"nv_amplify" is AMPLIFY (reference: modeling_amplify.AMPLIFY). `model_family` tells the other call sites.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from activation_checkpointing import apply_activation_checkpointing, resolve_checkpoint_plan
from distributed import is_distributed
from errors import RecipeError
from families import AMPLIFY_MODEL_TYPES, ESM_MODEL_TYPES, model_family
from precision import build_fp4_recipe, build_fp8_recipe, resolve_plan

if TYPE_CHECKING:  # transformers' model classes take a second to import: only where they are used
    from transformers import EsmConfig

    from modeling_amplify import AMPLIFYConfig

    ModelConfig = EsmConfig | AMPLIFYConfig

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
USE_TE_CHOICES = ("auto", "true", "false")
MASTER_WEIGHTS_HOMES = ("model", "optimizer")  # FP32 parameters, or BF16 parameters + FP32 copies in TE's FusedAdam


class ModelConfigError(RecipeError, ValueError):
    """The model configuration cannot be used; the message says how to fix it."""


def shipped_model_tags() -> list[str]:
    return sorted(p.name for p in MODEL_CONFIG_DIR.iterdir() if (p / "config.json").is_file())


def model_directory(model_tag: str) -> Path:
    """The folder holding `config.json` for `model_tag`: a shipped config name or any ESM-2 or AMPLIFY directory."""
    for candidate in (MODEL_CONFIG_DIR / model_tag, Path(model_tag).expanduser()):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelConfigError(
        f"model_tag={model_tag!r} is neither a shipped model config ({', '.join(shipped_model_tags())}) nor a "
        "directory with a config.json of a transformers ESM model or an AMPLIFY checkpoint (model_type 'AMPLIFY')."
    )


def load_model_config(model_tag: str) -> ModelConfig:
    """`model_tag`'s config: an `AMPLIFYConfig` for AMPLIFY directories (model_type "AMPLIFY"), else an `EsmConfig`."""
    directory = model_directory(model_tag)
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type in AMPLIFY_MODEL_TYPES:
        from modeling_amplify import AMPLIFYConfig

        return AMPLIFYConfig.from_pretrained(directory)
    from transformers import EsmConfig

    config = EsmConfig.from_pretrained(directory)
    if config.model_type not in ESM_MODEL_TYPES or config.is_folding_model:
        raise ModelConfigError(
            f"model_tag={model_tag!r} is a {config.model_type!r} config, not an ESM masked LM or AMPLIFY."
        )
    return config


def _normalise_use_te(setting: Any) -> str:
    value = str(setting).lower()
    if value not in USE_TE_CHOICES:
        raise ModelConfigError(f"use_te={setting!r} must be one of {USE_TE_CHOICES}.")
    return value


def te_unavailable_reason() -> str | None:
    """Why the TransformerEngine model cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed (see README: GPU set-up)"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # a broken install should say why, not crash later
        return f"transformer_engine failed to import ({type(exc).__name__}: {exc})"
    return None


REFERENCE_NAMES = {"esm2": "transformers EsmForMaskedLM", "amplify": "modeling_amplify.AMPLIFY"}
TE_NAMES = {"esm2": "ESM-2", "amplify": "AMPLIFY"}


def resolve_use_te(setting: Any, family: str = "esm2") -> tuple[bool, str]:
    """Decide between the TE model and the reference; returns (use TE, one-line reason for the log)."""
    value = _normalise_use_te(setting)
    reference, te_name = f"reference {REFERENCE_NAMES[family]}", f"TransformerEngine {TE_NAMES[family]}"
    if value == "false":
        return False, f"{reference} (use_te=false)"
    reason = te_unavailable_reason()
    if value == "true" and reason is not None:
        raise ModelConfigError(
            f"use_te=true but {reason}. Run on a GPU host with TransformerEngine, or set use_te=auto."
        )
    if reason is not None:
        return False, f"{reference} (use_te=auto: {reason})"
    return (
        True,
        f"{te_name} (use_te=auto: CUDA and transformer_engine available)"
        if value == "auto"
        else (f"{te_name} (use_te=true)"),
    )


def parameter_dtype(cfg: Any, device: torch.device | str) -> torch.dtype:
    """FP32 weights (BF16 compute via mixed precision) on CPU and by default.

    BF16 on a GPU when there are no FP32 master weights (`use_fp32_master_weights=false`) or the optimizer keeps
    them (`master_weights=optimizer`).
    """
    on_gpu = torch.device(device).type in ("cuda", "meta") and torch.cuda.is_available()
    fp32_params = cfg.use_fp32_master_weights and cfg.master_weights == "model"
    return torch.float32 if fp32_params or not on_gpu else torch.bfloat16


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters only: buffers such as the rotary frequencies keep their FP32 precision."""
    for param in model.parameters():
        param.data = param.data.to(dtype)


def build_model(
    cfg: Any, config: ModelConfig, *, use_te: bool, attn_input_format: str, device: torch.device | str
) -> nn.Module:
    """The masked-LM model on `device` ("meta" defers allocation until after sharding; see `materialize`).

    The TE model is built for the batch layout (`thd` for packed batches, else `bshd`) and, with FP8 on, gets its
    recipes here: FP8 and NVFP4 cover the transformer layers as the precision plan says (`fp8_layers`,
    `fp4_layers`; precision.py), never the embeddings or LM head. Layers recompute their activations in the
    backward pass where `activation_checkpointing` says so. With `cp_size` > 1 (TE model, packed batches: checked at
    start-up) the model splits each sequence over its CP group (`enable_context_parallel`).
    """
    model = _build_masked_lm(cfg, config, use_te=use_te, attn_input_format=attn_input_format, device=device)
    plan = resolve_checkpoint_plan(cfg.activation_checkpointing, config.num_hidden_layers)
    apply_activation_checkpointing(transformer_layers(model), plan, te_layers=use_te)
    if use_te and cfg.cp_size > 1:
        enable_context_parallel(model, int(cfg.cp_size), str(cfg.cp_comm_type))
    return model


def enable_context_parallel(model: nn.Module, cp_size: int, comm_type: str) -> None:
    """Give the TE model this rank's CP group of the (dp, cp) mesh (``NVEsmModel.set_context_parallel``).

    One CUDA stream serves TE's overlapped key/value exchange; the shard's extra inputs (``cu_seqlens_padded``,
    ``local_cu_seqlens``) come with each batch from ``context_parallel.ContextParallelCollator``.
    """
    from distributed import parallel_mesh

    group = parallel_mesh(cp_size)["cp"].get_group()
    backbone(model).set_context_parallel(group, dist.get_process_group_ranks(group), torch.cuda.Stream(), comm_type)


def _build_masked_lm(
    cfg: Any, config: ModelConfig, *, use_te: bool, attn_input_format: str, device: torch.device | str
) -> nn.Module:
    dtype = parameter_dtype(cfg, device)
    amplify = model_family(config) == "amplify"
    if not use_te:
        model = _reference_amplify(cfg, config, device) if amplify else _reference_esm(cfg, config, device)
        cast_parameters(model, dtype)
        return model
    plan = resolve_plan(cfg, config.num_hidden_layers)
    te_options = {
        "attn_input_format": attn_input_format,
        "fp8_layers": plan.numbers("fp8"),
        "fp4_layers": plan.numbers("fp4"),
        "params_dtype": str(dtype).removeprefix("torch."),
        "rope_kernel": cfg.rope_kernel,
        "norm_kernel": cfg.norm_kernel,
    }
    recipe, fp4_recipe = build_fp8_recipe(cfg), build_fp4_recipe(cfg)
    fp8_weights = recipe if recipe is not None and cfg.fp8_config.quantized_model_init else None
    build = _te_amplify if amplify else _te_esm
    model = build(cfg, config, te_options, device, fp8_weights)
    fp8_group = dist.group.WORLD if is_distributed() else None
    model.set_fp8(recipe, fp8_group=fp8_group, fp4_recipe=fp4_recipe)  # amax of delayed scaling reduced over all ranks
    return model


def _reference_esm(cfg: Any, config: EsmConfig, device: torch.device | str) -> nn.Module:
    from transformers import EsmForMaskedLM

    if cfg.pretrained:
        model = EsmForMaskedLM.from_pretrained(model_directory(cfg.model_tag), config=config).to(device)
    else:
        with torch.device(device):
            model = EsmForMaskedLM(config)
    model.esm.contact_head.requires_grad_(False)  # not part of masked-LM training; no optimizer state for it
    return model


def _reference_amplify(cfg: Any, config: AMPLIFYConfig, device: torch.device | str) -> nn.Module:
    if cfg.pretrained:
        from convert_amplify import load_amplify_checkpoint

        return load_amplify_checkpoint(model_directory(cfg.model_tag)).to(device)
    from modeling_amplify import AMPLIFY

    with torch.device(device):
        return AMPLIFY(config)


def _te_esm(
    cfg: Any, config: EsmConfig, te_options: dict[str, Any], device: torch.device | str, fp8_weights: Any
) -> nn.Module:
    from modeling_esm_te import NVEsmConfig, NVEsmForMaskedLM

    te_config = NVEsmConfig.from_esm_config(
        config,
        **te_options,
        fp32_residual_connection=bool(cfg.fp32_residual_connection),
        gelu_in_gemm=bool(cfg.gelu_in_gemm),
    )
    if cfg.pretrained:
        return NVEsmForMaskedLM.from_hf_checkpoint(model_directory(cfg.model_tag), config=te_config).to(device)
    return NVEsmForMaskedLM(te_config, device=device, fp8_weights_recipe=fp8_weights)


def _te_amplify(
    cfg: Any, config: AMPLIFYConfig, te_options: dict[str, Any], device: torch.device | str, fp8_weights: Any
) -> nn.Module:
    """The TE AMPLIFY; it has no FP32 residual option (config_validation refuses fp32_residual_connection)."""
    from modeling_amplify_te import NVAmplifyConfig, NVAmplifyForMaskedLM

    te_config = NVAmplifyConfig.from_amplify_config(config, **te_options)
    if cfg.pretrained:
        return NVAmplifyForMaskedLM.from_amplify_checkpoint(model_directory(cfg.model_tag), te_config, device)
    return NVAmplifyForMaskedLM(te_config, device=device, fp8_weights_recipe=fp8_weights)


def backbone(model: nn.Module) -> nn.Module:
    """The module holding embeddings and encoder: `esm`, `amplify` (TE AMPLIFY) or the model itself.

    The reference AMPLIFY keeps the public checkpoints' weight names, which have no prefix.
    """
    for name in ("esm", "amplify"):
        if hasattr(model, name):
            return getattr(model, name)
    return model


def is_te_model(model: nn.Module) -> bool:
    return hasattr(getattr(backbone(model), "encoder", None), "layers")


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, the unit each parallelism strategy shards or wraps."""
    if is_te_model(model):
        return list(backbone(model).encoder.layers)
    if hasattr(model, "transformer_encoder"):  # reference AMPLIFY
        return list(model.transformer_encoder)
    return list(model.esm.encoder.layer)


def compile_transformer_layers(model: nn.Module) -> None:
    """`torch.compile` each transformer layer in place, before the strategy wraps the model.

    Compiling the repeated block rather than the whole model keeps the strategy's own hooks (DDP's gradient buckets,
    FSDP's all-gathers) outside the compiled graphs, and all layers share one compiled graph, so compile time does
    not grow with depth.
    """
    for layer in transformer_layers(model):
        layer.compile()


def capture_cuda_graphs(model: nn.Module, static: Any, compute_dtype: torch.dtype) -> None:
    """Capture the TE model's layers in CUDA graphs for `static` (collator.StaticPacking) batch shapes.

    Capture runs under `compute_dtype` autocast when the weights are kept in another dtype (FP32 master weights), as
    the training forward does. Call it on the final, unwrapped model before the optimizer exists: the graphs hold
    the addresses of the weights and gradients.
    """
    weights_dtype = backbone(model).embeddings.word_embeddings.weight.dtype
    autocast_dtype = compute_dtype if weights_dtype != compute_dtype else None
    model.make_cuda_graphs(static.tokens, static.segments, static.max_seqlen, autocast_dtype)
    logger.info(
        "CUDA graphs captured for %d layers: batches of %d tokens, %d segments, max_seqlen %d.",
        len(transformer_layers(model)),
        static.tokens,
        static.segments,
        static.max_seqlen,
    )


class MaskedLMTuple(NamedTuple):
    """The model's output as a tuple: `.loss` and `.logits` read as on transformers' `MaskedLMOutput`."""

    loss: torch.Tensor | None
    logits: torch.Tensor


def _as_tuple(module: nn.Module, args: Any, output: Any) -> MaskedLMTuple:
    return MaskedLMTuple(output.loss, output.logits)


def return_tuple_outputs(model: nn.Module) -> None:
    """Make `model(...)` return a `MaskedLMTuple` instead of transformers' `MaskedLMOutput` (a dict).

    Megatron-FSDP starts each backward pass with a hook on the gradient of the root module's output, and only finds
    output tensors in a tensor, tuple or list. With a dict output that hook never fires; megatron-fsdp 0.6.1 then
    falls back to a hook on the last submodule it registered (the LM decoder), which fires after the LM-head bias
    already has its gradient. On more than one GPU that (a) zeroed the LM-head bias gradient and (b) reduced the
    gradient bucket of every parameter outside the transformer layers twice, so embeddings, final LayerNorm and LM
    head got the sum over ranks instead of the mean. benchmarks/mfsdp_gradient_check.py shows both, and the fix.
    A forward hook registered before wrapping runs before any hook the wrapper adds.
    """
    model.register_forward_hook(_as_tuple)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device model's (possibly sharded) storage on `device` and initialise it by its family's rule."""
    model.to_empty(device=device)
    model.init_weights()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
