"""AMPLIFY weight conversion: public (reference) layout <-> TransformerEngine layout, checkpoint loading and export.

Pure tensor bookkeeping that runs on a CPU-only machine and never imports TransformerEngine; the fused-QKV layout
helpers, row padding, rotary frequencies and the atomic export folder handling are convert.py's (ESM-2), reused.

TE layout (``modeling_amplify_te.NVAmplifyForMaskedLM``), per layer ``amplify.encoder.layers.{i}.``:

* ``self_attention.layernorm_qkv.layer_norm_weight`` <- ``attention_norm.weight`` (TE's fused RMSNorm).
* ``self_attention.layernorm_qkv.weight`` <- ``q``/``k``/``v`` in TE's per-head interleaved layout
  ``[head, (q|k|v), head_dim]`` (``fuse_qkv_params``), else ``{query,key,value}_weight``.
* ``self_attention.proj.weight`` <- ``wo.weight``.
* ``layernorm_mlp.layer_norm_weight`` <- ``ffn_norm.weight``.
* ``layernorm_mlp.fc1_weight`` <- ``ffn.w12.weight`` unchanged: TE's ``swiglu`` computes ``silu(a) * b`` for
  ``fc1 = [a; b]`` (gate first, ``ops/basic/swiglu.py``), and xformers' packed ``w12`` is ``[w1; w2]`` with
  ``silu(x w1ᵀ) * x w2ᵀ``, gate first too.
* ``layernorm_mlp.fc2_weight`` <- ``ffn.w3.weight``.

Outside the layers: ``amplify.embeddings.word_embeddings.weight`` <- ``encoder.weight``; ``decoder.layer_norm_weight``
(the final RMSNorm, fused into the decoder's ``te.LayerNormLinear``) <- ``layer_norm_2.weight``; ``decoder.weight``
and ``decoder.bias`` <- the same names; ``amplify.rotary_embeddings.inv_freq`` is derived. The embedding and decoder
carry ``padded_vocab_size`` rows in TE (zero past the real vocabulary; no gradient ever reaches them) and
``vocab_size`` rows in the public layout.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from convert import (
    EXTRA_STATE_SUFFIX,
    _fused_qkv,
    _pad_rows,
    _unshared_cpu_tensors,
    check_export_target,
    fuse_qkv,
    load_hf_state_dict,
    rotary_inverse_frequencies,
    single_dtype,
    split_qkv,
    te_vocab_rows,
    write_export_folder,
)
from distributed import DistributedContext
from modeling_amplify import (
    AMPLIFY,
    ROPE_THETA,
    AMPLIFYConfig,
    amplify_state_dict_shapes,
    check_state_dict,
    check_supported_config,
    swiglu_hidden_size,
)

logger = logging.getLogger(__name__)

MODELING_FILE = Path(__file__).resolve().parent / "modeling_amplify.py"
EXPORT_FORMAT_TAG = "amplify-export"
AUTO_MAP = {
    "AutoConfig": "modeling_amplify.AMPLIFYConfig",
    "AutoModel": "modeling_amplify.AMPLIFY",
    "AutoModelForMaskedLM": "modeling_amplify.AMPLIFY",
}
# Keys of the public config.json (chandar-lab/AMPLIFY_120M), written in this order-independent set by the export.
PUBLIC_CONFIG_KEYS = (
    "att_bias",
    "bos_token_id",
    "decoder_init_range",
    "dropout_prob",
    "embedding_init_range",
    "eos_token_id",
    "ffn_bias",
    "hidden_act",
    "hidden_size",
    "intermediate_size",
    "layer_norm_after_embedding",
    "layer_norm_before_last_layer",
    "mask_token_id",
    "max_length",
    "norm_eps",
    "num_attention_heads",
    "num_hidden_layers",
    "other_special_token_ids",
    "pad_token_id",
    "rms_norm",
    "unk_token_id",
    "vocab_size",
)
# Informational keys the public config.json also carries; kept when the source config has them.
PASSTHROUGH_CONFIG_KEYS = ("_name_", "pre_activation_layer_norm", "vocab_path")

TE_EMBEDDING_KEY = "amplify.embeddings.word_embeddings.weight"
TE_INV_FREQ_KEY = "amplify.rotary_embeddings.inv_freq"
TE_DECODER_NORM_KEY = "decoder.layer_norm_weight"
TE_DECODER_KEY = "decoder.weight"
TE_DECODER_BIAS_KEY = "decoder.bias"
_TE_LAYER_PREFIX = "amplify.encoder.layers.{}."
_QKV = (("q", "query"), ("k", "key"), ("v", "value"))
_LAYER_KEYS = {  # public suffix under transformer_encoder.{i} -> TE suffix under amplify.encoder.layers.{i}
    "attention_norm.weight": "self_attention.layernorm_qkv.layer_norm_weight",
    "wo.weight": "self_attention.proj.weight",
    "ffn_norm.weight": "layernorm_mlp.layer_norm_weight",
    "ffn.w12.weight": "layernorm_mlp.fc1_weight",
    "ffn.w3.weight": "layernorm_mlp.fc2_weight",
}


def te_amplify_state_dict_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``NVAmplifyForMaskedLM(config).state_dict()`` without TE's ``_extra_state`` entries."""
    hidden, ffn, rows = config.hidden_size, swiglu_hidden_size(config.intermediate_size), te_vocab_rows(config)
    head_dim = hidden // config.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {TE_EMBEDDING_KEY: (rows, hidden), TE_INV_FREQ_KEY: (head_dim // 2,)}
    for index in range(config.num_hidden_layers):
        prefix = _TE_LAYER_PREFIX.format(index)
        qkv = prefix + "self_attention.layernorm_qkv."
        if _fused_qkv(config):
            shapes[qkv + "weight"] = (3 * hidden, hidden)
        else:
            shapes.update({f"{qkv}{name}_weight": (hidden, hidden) for _, name in _QKV})
        shapes[qkv + "layer_norm_weight"] = (hidden,)
        shapes[prefix + "self_attention.proj.weight"] = (hidden, hidden)
        shapes[prefix + "layernorm_mlp.layer_norm_weight"] = (hidden,)
        shapes[prefix + "layernorm_mlp.fc1_weight"] = (2 * ffn, hidden)
        shapes[prefix + "layernorm_mlp.fc2_weight"] = (hidden, ffn)
    shapes.update({TE_DECODER_NORM_KEY: (hidden,), TE_DECODER_KEY: (rows, hidden), TE_DECODER_BIAS_KEY: (rows,)})
    return shapes


def convert_amplify_to_te(state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Public-layout AMPLIFY tensors -> the TE model's keys (load with ``load_te_state_dict``); validates first."""
    check_supported_config(config)
    check_state_dict(state_dict, amplify_state_dict_shapes(config), "AMPLIFY checkpoint")
    rows, heads = te_vocab_rows(config), config.num_attention_heads
    head_dim = config.hidden_size // heads
    te_state = {
        TE_EMBEDDING_KEY: _pad_rows(state_dict["encoder.weight"], rows),
        TE_INV_FREQ_KEY: rotary_inverse_frequencies(head_dim, ROPE_THETA),
        TE_DECODER_NORM_KEY: state_dict["layer_norm_2.weight"],
        TE_DECODER_KEY: _pad_rows(state_dict["decoder.weight"], rows),
        TE_DECODER_BIAS_KEY: _pad_rows(state_dict["decoder.bias"], rows),
    }
    for index in range(config.num_hidden_layers):
        source, target = f"transformer_encoder.{index}.", _TE_LAYER_PREFIX.format(index)
        qkv = [state_dict[f"{source}{short}.weight"] for short, _ in _QKV]
        qkv_prefix = target + "self_attention.layernorm_qkv."
        if _fused_qkv(config):
            te_state[qkv_prefix + "weight"] = fuse_qkv(*qkv, heads)
        else:
            te_state.update({f"{qkv_prefix}{name}_weight": t for (_, name), t in zip(_QKV, qkv, strict=True)})
        for public, te_name in _LAYER_KEYS.items():
            te_state[target + te_name] = state_dict[source + public]
    return te_state


def convert_te_to_amplify(te_state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """TE model tensors -> exactly the public AMPLIFY keys; FP8 ``_extra_state`` ignored, padded rows dropped."""
    check_supported_config(config)
    state = {key: value for key, value in te_state_dict.items() if not key.endswith(EXTRA_STATE_SUFFIX)}
    check_state_dict(state, te_amplify_state_dict_shapes(config), "TE AMPLIFY state dict", frozenset({TE_INV_FREQ_KEY}))
    vocab, heads = config.vocab_size, config.num_attention_heads
    converted = {
        "encoder.weight": state[TE_EMBEDDING_KEY][:vocab],
        "layer_norm_2.weight": state[TE_DECODER_NORM_KEY],
        "decoder.weight": state[TE_DECODER_KEY][:vocab],
        "decoder.bias": state[TE_DECODER_BIAS_KEY][:vocab],
    }
    for index in range(config.num_hidden_layers):
        source, target = _TE_LAYER_PREFIX.format(index), f"transformer_encoder.{index}."
        qkv_prefix = source + "self_attention.layernorm_qkv."
        if _fused_qkv(config):
            parts = split_qkv(state[qkv_prefix + "weight"], heads)
        else:
            parts = tuple(state[f"{qkv_prefix}{name}_weight"] for _, name in _QKV)
        converted.update({f"{target}{short}.weight": t for (short, _), t in zip(_QKV, parts, strict=True)})
        for public, te_name in _LAYER_KEYS.items():
            converted[target + public] = state[source + te_name]
    return {key: converted[key] for key in amplify_state_dict_shapes(config)}


def load_amplify_state_dict(checkpoint_dir: str | Path, config: Any) -> dict[str, torch.Tensor]:
    """Tensors of a public-layout checkpoint directory, checked against ``config`` (one error naming the tensor)."""
    state = load_hf_state_dict(checkpoint_dir)
    check_state_dict(state, amplify_state_dict_shapes(config), f"AMPLIFY checkpoint {checkpoint_dir}")
    return state


def load_amplify_checkpoint(checkpoint_dir: str | Path, dtype: torch.dtype | None = None) -> AMPLIFY:
    """The reference model of a downloaded AMPLIFY checkpoint (``config.json`` + weights), validated before loading."""
    config = AMPLIFYConfig.from_pretrained(checkpoint_dir)
    state = load_amplify_state_dict(checkpoint_dir, config)
    with torch.device("meta"):
        model = AMPLIFY(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype) if dtype is not None else model


def public_config_dict(config: Any) -> dict[str, Any]:
    """``config.json`` content in the public AMPLIFY key format plus ``auto_map`` to the shipped modeling file."""
    values = {key: getattr(config, key) for key in PUBLIC_CONFIG_KEYS}
    values.update({key: getattr(config, key) for key in PASSTHROUGH_CONFIG_KEYS if hasattr(config, key)})
    values.update({"architectures": ["AMPLIFY"], "auto_map": dict(AUTO_MAP), "model_type": "AMPLIFY"})
    values["tie_word_embeddings"] = False
    return dict(sorted(values.items()))


def _save_tokenizer(tokenizer_dir: str | Path, target: Path) -> None:
    """Copy the tokenizer, naming the public fast-tokenizer class that every transformers release can load."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    config_file = target / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _write_export(tensors: dict[str, torch.Tensor], config: Any, staging: Path, tokenizer_dir: str | Path) -> None:
    save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
    values = public_config_dict(config)
    if (dtype := single_dtype(tensors)) is not None:
        values["torch_dtype"] = str(dtype).removeprefix("torch.")
    (staging / "config.json").write_text(json.dumps(values, indent=2) + "\n")
    shutil.copyfile(MODELING_FILE, staging / MODELING_FILE.name)
    _save_tokenizer(tokenizer_dir, staging)


def export_amplify_model(
    state_dict: Mapping[str, torch.Tensor],
    config: Any,
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    source_format: Literal["te", "amplify"] = "te",
    overwrite: bool = False,
    model_card: str | None = None,
) -> Path:
    """Write a self-contained AMPLIFY checkpoint folder that loads without the recipe.

    It holds public-layout safetensors, ``config.json`` with ``auto_map``, ``modeling_amplify.py`` (torch and
    transformers only) and the tokenizer.

    It loads offline with ``AutoModelForMaskedLM.from_pretrained(out_dir, trust_remote_code=True)`` and
    ``AutoTokenizer.from_pretrained(out_dir)``, and back into the TE model with ``from_amplify_checkpoint``.
    Written to a sibling folder first and renamed into place, so a crash never leaves half an export.
    """
    if source_format not in ("te", "amplify"):
        raise ValueError(f"source_format must be 'te' or 'amplify', got {source_format!r}")
    target = Path(out_dir)
    check_export_target(target, overwrite, EXPORT_FORMAT_TAG, kind="AMPLIFY")
    if source_format == "te":
        public = convert_te_to_amplify(state_dict, config)
    else:  # validate every key and shape
        public = convert_te_to_amplify(convert_amplify_to_te(state_dict, config), config)
    tensors = _unshared_cpu_tensors(public)
    write_files = lambda staging: _write_export(tensors, config, staging, tokenizer_dir)  # noqa: E731
    return write_export_folder(target, source_format, write_files, model_card, format_tag=EXPORT_FORMAT_TAG)


def export_final_amplify_model(
    state_dict: Mapping[str, torch.Tensor],
    config: Any,
    ckpt_dir: Path,
    tokenizer_dir: str | Path,
    context: DistributedContext,
    model_card: str | None = None,
) -> Path:
    """The end of training: rank 0 writes ``<ckpt_dir>/final_model`` (see ``export_amplify_model``), the others wait."""
    out_dir = ckpt_dir / "final_model"
    if context.is_main:
        source = "te" if getattr(config, "model_type", None) == "nv_amplify" else "amplify"
        export_amplify_model(
            state_dict, config, out_dir, tokenizer_dir, source_format=source, overwrite=True, model_card=model_card
        )
        logger.info("Exported the final AMPLIFY model to %s (trust_remote_code=True).", out_dir)
    context.barrier()
    return out_dir
