"""Weight conversion between transformers' ``EsmForMaskedLM`` and the TransformerEngine ESM-2 model, plus final export.

Everything here is pure tensor bookkeeping on whatever device the tensors live on, so it runs on a CPU-only machine
and never imports TransformerEngine. The TE state-dict layout is derived from the config alone (see
:func:`te_state_dict_shapes`); the transformers layout is learnt from the installed transformers release by building
``EsmForMaskedLM`` on the meta device, so a release that renames a key fails loudly instead of converting silently.

TE layout (``modeling_esm_te.NVEsmForMaskedLM``), per layer ``esm.encoder.layers.{i}``:

* ``self_attention.layernorm_qkv.{layer_norm_weight,layer_norm_bias}``: the pre-attention LayerNorm.
* ``self_attention.layernorm_qkv.{weight,bias}`` with fused QKV: rows grouped per head, ``[head, (q|k|v), head_dim]``
  (TE's ``qkv_weight_interleaved=True``); without fused QKV: ``{query,key,value}_{weight,bias}``.
* ``self_attention.proj.{weight,bias}``: attention output projection.
* ``layernorm_mlp.{layer_norm_weight,layer_norm_bias,fc1_weight,fc1_bias,fc2_weight,fc2_bias}``: pre-MLP LayerNorm
  and the two MLP projections.

The word embedding, the tied LM decoder and the LM-head bias carry ``padded_vocab_size`` rows in TE (zero rows past
the real vocabulary) and ``vocab_size`` rows in transformers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file, save_file

from distributed import DistributedContext
from errors import RecipeError
from precision import round_up

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # transformers' model classes take a second to import: only where they are used
    from transformers import EsmConfig

VOCAB_PAD_MULTIPLE = 64
EXPORT_MANIFEST = "export_manifest.json"
EXPORT_FORMAT_TAG = "esm2-transformers-export"
EXTRA_STATE_SUFFIX = "_extra_state"

EMBEDDING_KEY = "esm.embeddings.word_embeddings.weight"
DECODER_KEY = "lm_head.decoder.weight"
LM_BIAS_KEY = "lm_head.bias"
INV_FREQ_KEY = "esm.rotary_embeddings.inv_freq"

# Saved checkpoints differ from the in-memory state dict. Older releases persisted the embeddings' position ids
# (carry nothing) and one rotary inv_freq per layer; transformers 5 save_pretrained writes LayerNorm parameters as
# gamma/beta and the rotary inv_freq under the literal pattern key "esm.encoder.layer.*.attention.self....".
_OBSOLETE_HF_KEYS = re.compile(r"^esm\.embeddings\.position_ids$")
_LEGACY_HF_INV_FREQ = re.compile(r"^esm\.encoder\.layer\.(\d+|\*)\.attention\.self\.rotary_embeddings\.inv_freq$")
_LEGACY_LAYER_NORM = re.compile(r"LayerNorm\.(gamma|beta)$")
_LEGACY_LAYER_NORM_NAMES = {"gamma": "LayerNorm.weight", "beta": "LayerNorm.bias"}
_LAYER_INDEX = re.compile(r"^esm\.encoder\.layers?\.(\d+)\.")

# Tensors copied unchanged; transformers name -> TE name.
_SHARED_KEYS = {
    "esm.encoder.emb_layer_norm_after.weight": "esm.encoder.emb_layer_norm_after.weight",
    "esm.encoder.emb_layer_norm_after.bias": "esm.encoder.emb_layer_norm_after.bias",
    "esm.contact_head.regression.weight": "esm.contact_head.regression_weight",
    "esm.contact_head.regression.bias": "esm.contact_head.regression_bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
}

# Per-layer tensors copied unchanged; suffix under esm.encoder.layer.{i} -> suffix under esm.encoder.layers.{i}.
_LAYER_KEYS = {
    "attention.LayerNorm.weight": "self_attention.layernorm_qkv.layer_norm_weight",
    "attention.LayerNorm.bias": "self_attention.layernorm_qkv.layer_norm_bias",
    "attention.output.dense.weight": "self_attention.proj.weight",
    "attention.output.dense.bias": "self_attention.proj.bias",
    "LayerNorm.weight": "layernorm_mlp.layer_norm_weight",
    "LayerNorm.bias": "layernorm_mlp.layer_norm_bias",
    "intermediate.dense.weight": "layernorm_mlp.fc1_weight",
    "intermediate.dense.bias": "layernorm_mlp.fc1_bias",
    "output.dense.weight": "layernorm_mlp.fc2_weight",
    "output.dense.bias": "layernorm_mlp.fc2_bias",
}
_QKV = ("query", "key", "value")


class MissingKeysError(RecipeError, KeyError):
    """A KeyError whose message prints as written (KeyError's own str() shows the repr of its argument)."""

    def __str__(self) -> str:
        return str(self.args[0])


# --------------------------------------------------------------------------------------------------------------------
# Config helpers (duck-typed: any EsmConfig, NVEsmConfig or object with the same attributes)
# --------------------------------------------------------------------------------------------------------------------


def round_up_vocab(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Smallest multiple of ``multiple`` ≥ ``vocab_size`` (tensor-core friendly embedding/decoder row count)."""
    return round_up(vocab_size, multiple)


def te_vocab_rows(config: Any) -> int:
    """Row count of the TE embedding/decoder: ``padded_vocab_size``, the vocabulary itself when that is None.

    A plain ``EsmConfig`` (no ``padded_vocab_size`` attribute) gets the default of ``NVEsmConfig.from_esm_config``:
    the vocabulary rounded up to a multiple of 64.
    """
    if not hasattr(config, "padded_vocab_size"):
        return round_up_vocab(config.vocab_size)
    rows = config.padded_vocab_size if config.padded_vocab_size is not None else config.vocab_size
    if rows < config.vocab_size:
        raise ValueError(
            f"padded_vocab_size ({rows}) is smaller than vocab_size ({config.vocab_size}); set it to "
            f"{round_up_vocab(config.vocab_size)} or None"
        )
    return rows


def _fused_qkv(config: Any) -> bool:
    return bool(getattr(config, "fuse_qkv_params", True))


def _head_dim(config: Any) -> int:
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) is not divisible by num_attention_heads ({config.num_attention_heads})"
        )
    return config.hidden_size // config.num_attention_heads


def rotary_inverse_frequencies(head_dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary inverse frequencies with the exact float32 arithmetic of transformers' ESM (bit-identical on CPU)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_base(config: Any) -> float:
    """Rotary base of the config (``rope_theta`` in transformers 5; ESM-2 always used 10000)."""
    return float(getattr(config, "rope_theta", None) or 10000.0)


def to_esm_config(config: Any) -> EsmConfig:
    """Plain transformers ``EsmConfig`` for ``config``, dropping the TE-only fields of an ``NVEsmConfig``.

    TE-only fields are found as the dataclass fields that ``EsmConfig`` lacks, so new TE options need no edit here.
    """
    from transformers import EsmConfig

    if type(config) is EsmConfig:
        return config
    values = config.to_dict()
    if dataclasses.is_dataclass(config):
        esm_fields = {field.name for field in dataclasses.fields(EsmConfig)}
        for field in dataclasses.fields(config):
            if field.name not in esm_fields:
                values.pop(field.name, None)
    values.pop("model_type", None)
    values["architectures"] = ["EsmForMaskedLM"]
    return EsmConfig.from_dict(values)


# --------------------------------------------------------------------------------------------------------------------
# Expected layouts
# --------------------------------------------------------------------------------------------------------------------


def hf_state_dict_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the installed transformers' ``EsmForMaskedLM(config).state_dict()`` (built on meta)."""
    with torch.device("meta"):
        from transformers import EsmForMaskedLM

        reference = EsmForMaskedLM(to_esm_config(config))
    return {key: tuple(tensor.shape) for key, tensor in reference.state_dict().items()}


def te_state_dict_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``NVEsmForMaskedLM(config).state_dict()`` without TE's ``_extra_state`` entries."""
    hidden, inner = config.hidden_size, config.intermediate_size
    rows = te_vocab_rows(config)
    shapes: dict[str, tuple[int, ...]] = {
        EMBEDDING_KEY: (rows, hidden),
        INV_FREQ_KEY: (_head_dim(config) // 2,),
    }
    for index in range(config.num_hidden_layers):
        prefix = f"esm.encoder.layers.{index}."
        qkv = prefix + "self_attention.layernorm_qkv."
        shapes[qkv + "layer_norm_weight"] = (hidden,)
        shapes[qkv + "layer_norm_bias"] = (hidden,)
        if _fused_qkv(config):
            shapes[qkv + "weight"] = (3 * hidden, hidden)
            shapes[qkv + "bias"] = (3 * hidden,)
        else:
            for name in _QKV:
                shapes[f"{qkv}{name}_weight"] = (hidden, hidden)
                shapes[f"{qkv}{name}_bias"] = (hidden,)
        shapes[prefix + "self_attention.proj.weight"] = (hidden, hidden)
        shapes[prefix + "self_attention.proj.bias"] = (hidden,)
        shapes[prefix + "layernorm_mlp.layer_norm_weight"] = (hidden,)
        shapes[prefix + "layernorm_mlp.layer_norm_bias"] = (hidden,)
        shapes[prefix + "layernorm_mlp.fc1_weight"] = (inner, hidden)
        shapes[prefix + "layernorm_mlp.fc1_bias"] = (inner,)
        shapes[prefix + "layernorm_mlp.fc2_weight"] = (hidden, inner)
        shapes[prefix + "layernorm_mlp.fc2_bias"] = (hidden,)
    shapes.update(
        {
            "esm.encoder.emb_layer_norm_after.weight": (hidden,),
            "esm.encoder.emb_layer_norm_after.bias": (hidden,),
            "esm.contact_head.regression_weight": (1, config.num_hidden_layers * config.num_attention_heads),
            "esm.contact_head.regression_bias": (1,),
            "lm_head.dense.weight": (hidden, hidden),
            "lm_head.dense.bias": (hidden,),
            "lm_head.layer_norm.weight": (hidden,),
            "lm_head.layer_norm.bias": (hidden,),
            DECODER_KEY: (rows, hidden),
            LM_BIAS_KEY: (rows,),
        }
    )
    return shapes


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


def _check_config_matches(state_dict: Mapping[str, torch.Tensor], config: Any, side: str) -> None:
    """Name the config field that disagrees with the checkpoint before the per-key checks drown it in key lists."""
    hint = "pass the config that belongs to this checkpoint (its own config.json)"
    layers = {int(match.group(1)) for key in state_dict if (match := _LAYER_INDEX.match(key))}
    if layers and max(layers) + 1 != config.num_hidden_layers:
        raise ValueError(
            f"{side} state dict has {max(layers) + 1} transformer layers but config.num_hidden_layers is "
            f"{config.num_hidden_layers}; {hint}"
        )
    embedding = state_dict.get(EMBEDDING_KEY)
    if embedding is not None and embedding.dim() == 2:
        if embedding.shape[1] != config.hidden_size:
            raise ValueError(
                f"{side} {EMBEDDING_KEY} has width {embedding.shape[1]} but config.hidden_size is "
                f"{config.hidden_size}; {hint}"
            )
        rows, field = (
            (config.vocab_size, "vocab_size") if side == "HF" else (te_vocab_rows(config), "padded_vocab_size")
        )
        if embedding.shape[0] != rows:
            raise ValueError(
                f"{side} {EMBEDDING_KEY} has {embedding.shape[0]} rows but the config implies {rows} "
                f"(config.{field}); {hint}"
            )
    contact_key = "esm.contact_head.regression.weight" if side == "HF" else "esm.contact_head.regression_weight"
    contact = state_dict.get(contact_key)
    expected_features = config.num_hidden_layers * config.num_attention_heads
    if contact is not None and contact.dim() == 2 and contact.shape[1] != expected_features:
        raise ValueError(
            f"{side} {contact_key} has {contact.shape[1]} inputs (layers x heads) but the config implies "
            f"{expected_features} ({config.num_hidden_layers} layers x {config.num_attention_heads} heads); {hint}"
        )


def _check_keys_and_shapes(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    optional: set[str],
    side: str,
) -> None:
    missing = [key for key in expected if key not in state_dict and key not in optional]
    if missing:
        raise MissingKeysError(
            f"{side} state dict is missing {len(missing)} key(s), first: {missing[:5]}; it does not look like a "
            f"complete {side} ESM-2 checkpoint for this config (check the source format and the config)"
        )
    unexpected = [key for key in state_dict if key not in expected]
    if unexpected:
        raise ValueError(
            f"{side} state dict has {len(unexpected)} unexpected key(s), first: {unexpected[:5]}; strip wrapper "
            "prefixes such as 'module.' or '_orig_mod.' and pass the matching source format"
        )
    for key, shape in expected.items():
        if key in state_dict and tuple(state_dict[key].shape) != shape:
            raise ValueError(
                f"{side} tensor {key} has shape {tuple(state_dict[key].shape)}, expected {shape} from the config; "
                "the checkpoint and the config describe different models"
            )


def _check_tied_decoder(state_dict: Mapping[str, torch.Tensor], rows: int, side: str) -> None:
    decoder = state_dict.get(DECODER_KEY)
    if decoder is not None and not torch.equal(decoder[:rows], state_dict[EMBEDDING_KEY][:rows]):
        raise ValueError(
            f"{side} {DECODER_KEY} differs from {EMBEDDING_KEY}, but ESM-2 ties the LM decoder to the word "
            "embeddings; an untied checkpoint cannot be represented"
        )


def _require_tied(config: Any) -> None:
    if not getattr(config, "tie_word_embeddings", True):
        raise ValueError("config.tie_word_embeddings is False, but the TE model always ties the decoder to embeddings")


# --------------------------------------------------------------------------------------------------------------------
# Tensor layout helpers
# --------------------------------------------------------------------------------------------------------------------


def fuse_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Stack Q/K/V weights (or biases) into TE's interleaved layout: output rows ordered ``[head, (q|k|v), dim]``."""
    per_head = [tensor.reshape(num_heads, -1, *tensor.shape[1:]) for tensor in (query, key, value)]
    return torch.stack(per_head, dim=1).reshape(3 * query.shape[0], *query.shape[1:])


def split_qkv(fused: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    rows = fused.shape[0] // 3
    query, key, value = fused.reshape(num_heads, 3, -1, *fused.shape[1:]).unbind(dim=1)
    return tuple(tensor.reshape(rows, *fused.shape[1:]) for tensor in (query, key, value))


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded


# --------------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------------


def _normalise_hf(hf_state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Bring a transformers state dict from any supported release to the current layout.

    Drops obsolete keys, renames gamma/beta LayerNorm parameters, moves per-layer rotary frequencies to the
    model-level key, and fills the two derivable keys that saved checkpoints may omit: the tied decoder and the rotary
    inverse frequencies.
    """
    state = {
        _LEGACY_LAYER_NORM.sub(lambda match: _LEGACY_LAYER_NORM_NAMES[match.group(1)], key): value
        for key, value in hf_state_dict.items()
        if not _OBSOLETE_HF_KEYS.match(key)
    }
    legacy_inv_freq = sorted(key for key in state if _LEGACY_HF_INV_FREQ.match(key))
    if legacy_inv_freq:
        first = state[legacy_inv_freq[0]]
        for key in legacy_inv_freq:
            state.pop(key)
        state.setdefault(INV_FREQ_KEY, first)
    state.setdefault(INV_FREQ_KEY, rotary_inverse_frequencies(_head_dim(config), rope_base(config)))
    if EMBEDDING_KEY in state:
        state.setdefault(DECODER_KEY, state[EMBEDDING_KEY])
    return state


def convert_hf_to_te(hf_state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Map a transformers ``EsmForMaskedLM`` state dict onto the TE model's keys (load it with ``load_te_state_dict``).

    Accepts the current transformers layout as well as saved checkpoints that omit the tied decoder or keep the rotary
    frequencies per layer. Output tensors may share memory with the input.
    """
    _require_tied(config)
    state = _normalise_hf(hf_state_dict, config)
    _check_config_matches(state, config, "HF")
    current_shapes = hf_state_dict_shapes(config)
    # Accept the model-level inv_freq even if the installed release keeps it per layer; normalised above.
    expected = {key: shape for key, shape in current_shapes.items() if not _LEGACY_HF_INV_FREQ.match(key)}
    expected[INV_FREQ_KEY] = (_head_dim(config) // 2,)
    _check_keys_and_shapes(state, expected, optional=set(), side="HF")
    _check_tied_decoder(state, config.vocab_size, "HF")

    rows = te_vocab_rows(config)
    num_heads = config.num_attention_heads
    embedding = _pad_rows(state[EMBEDDING_KEY], rows)
    te_state = {EMBEDDING_KEY: embedding, INV_FREQ_KEY: state[INV_FREQ_KEY]}
    for index in range(config.num_hidden_layers):
        hf_prefix, te_prefix = f"esm.encoder.layer.{index}.", f"esm.encoder.layers.{index}."
        qkv_prefix = te_prefix + "self_attention.layernorm_qkv."
        for kind in ("weight", "bias"):
            query, key, value = (state[f"{hf_prefix}attention.self.{name}.{kind}"] for name in _QKV)
            if _fused_qkv(config):
                te_state[qkv_prefix + kind] = fuse_qkv(query, key, value, num_heads)
            else:
                for name, tensor in zip(_QKV, (query, key, value), strict=True):
                    te_state[f"{qkv_prefix}{name}_{kind}"] = tensor
        for hf_suffix, te_suffix in _LAYER_KEYS.items():
            te_state[te_prefix + te_suffix] = state[hf_prefix + hf_suffix]
    for hf_key, te_key in _SHARED_KEYS.items():
        te_state[te_key] = state[hf_key]
    te_state[DECODER_KEY] = embedding
    te_state[LM_BIAS_KEY] = _pad_rows(state[LM_BIAS_KEY], rows)
    return te_state


def convert_te_to_hf(te_state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Map a TE model state dict onto exactly the keys of the installed transformers' ``EsmForMaskedLM``.

    TE ``_extra_state`` entries (FP8 metadata) are ignored; the padded vocabulary rows are dropped; the rotary
    frequencies are taken from the TE state dict or, if it has none, recomputed from the config. Output tensors may
    share memory with the input.
    """
    _require_tied(config)
    state = {key: value for key, value in te_state_dict.items() if not key.endswith(EXTRA_STATE_SUFFIX)}
    _check_config_matches(state, config, "TE")
    _check_keys_and_shapes(state, te_state_dict_shapes(config), optional={INV_FREQ_KEY, DECODER_KEY}, side="TE")
    _check_tied_decoder(state, te_vocab_rows(config), "TE")

    vocab, num_heads = config.vocab_size, config.num_attention_heads
    inv_freq = state.get(INV_FREQ_KEY)
    if inv_freq is None:
        inv_freq = rotary_inverse_frequencies(_head_dim(config), rope_base(config))
    embedding = state[EMBEDDING_KEY][:vocab]
    converted = {
        EMBEDDING_KEY: embedding,
        DECODER_KEY: embedding,
        LM_BIAS_KEY: state[LM_BIAS_KEY][:vocab],
    }
    for index in range(config.num_hidden_layers):
        hf_prefix, te_prefix = f"esm.encoder.layer.{index}.", f"esm.encoder.layers.{index}."
        qkv_prefix = te_prefix + "self_attention.layernorm_qkv."
        for kind in ("weight", "bias"):
            if _fused_qkv(config):
                parts = split_qkv(state[qkv_prefix + kind], num_heads)
            else:
                parts = tuple(state[f"{qkv_prefix}{name}_{kind}"] for name in _QKV)
            for name, tensor in zip(_QKV, parts, strict=True):
                converted[f"{hf_prefix}attention.self.{name}.{kind}"] = tensor
        for hf_suffix, te_suffix in _LAYER_KEYS.items():
            converted[hf_prefix + hf_suffix] = state[te_prefix + te_suffix]
    for hf_key, te_key in _SHARED_KEYS.items():
        converted[hf_key] = state[te_key]

    hf_state = {}
    for key in hf_state_dict_shapes(config):
        if key == INV_FREQ_KEY or _LEGACY_HF_INV_FREQ.match(key):
            hf_state[key] = inv_freq
        elif key in converted:
            hf_state[key] = converted[key]
        else:
            raise KeyError(f"installed transformers' EsmForMaskedLM has key {key!r} that convert.py does not map")
    return hf_state


# --------------------------------------------------------------------------------------------------------------------
# Loading and export
# --------------------------------------------------------------------------------------------------------------------


def load_hf_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a transformers checkpoint directory (single or sharded safetensors, or ``pytorch_model.bin``)."""
    directory = Path(checkpoint_dir)
    single, index, legacy = (
        directory / "model.safetensors",
        directory / "model.safetensors.index.json",
        directory / "pytorch_model.bin",
    )
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {directory}; "
        "is this a transformers checkpoint directory?"
    )


def _is_previous_export(directory: Path, format_tag: str = EXPORT_FORMAT_TAG) -> bool:
    manifest = directory / EXPORT_MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == format_tag
    except (OSError, ValueError):
        return False


def _unshared_cpu_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no two sharing storage (safetensors refuses shared or strided tensors)."""
    seen_storages: set[int] = set()
    result = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        result[key] = tensor
    return result


def source_format_of(config: Any) -> Literal["te", "hf"]:
    """Which layout a model of this config has: the TE model's (``nv_esm``) or transformers' (``esm``)."""
    return "te" if getattr(config, "model_type", None) == "nv_esm" else "hf"


def check_export_target(
    target: Path, overwrite: bool, format_tag: str = EXPORT_FORMAT_TAG, kind: str = "model"
) -> None:
    """Refuse to replace a non-empty folder unless it is an earlier export of this format or `overwrite` is set."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"export target {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not _is_previous_export(target, format_tag) and not overwrite:
        raise FileExistsError(
            f"{target} is not empty and is not an earlier {kind} export; pass overwrite=True to replace it or pick "
            "another directory"
        )


def single_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype all exported tensors share (what config.json records), or None when they differ."""
    dtypes = {tensor.dtype for tensor in tensors.values()}
    return next(iter(dtypes)) if len(dtypes) == 1 else None


def _publish(staging: Path, target: Path) -> None:
    """Move a finished `staging` folder to `target`, replacing an earlier export only once the new one is whole."""
    if target.exists():
        retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired)
    else:
        staging.rename(target)


def _export_config(config: Any, tensors: Mapping[str, torch.Tensor], trained_length: int | None) -> EsmConfig:
    """The exported ``config.json``: plain ESM, the weights' dtype, positions for the length the model trained at."""
    esm_config = copy.deepcopy(to_esm_config(config))  # the live model's config stays as it is
    esm_config.architectures = ["EsmForMaskedLM"]
    esm_config.max_position_embeddings = max(esm_config.max_position_embeddings, trained_length or 0)
    if (dtype := single_dtype(tensors)) is not None:
        esm_config.dtype = dtype
    return esm_config


def export_hf_model(
    state_dict: Mapping[str, torch.Tensor],
    config: Any,
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    source_format: Literal["te", "hf"] = "te",
    overwrite: bool = False,
    model_card: str | None = None,
    trained_length: int | None = None,
) -> Path:
    """Write a standard transformers ESM-2 checkpoint (weights, ``config.json``, tokenizer) to ``out_dir``.

    ``model_card`` (markdown) becomes the folder's ``README.md``, what model hubs and people read first.
    ``trained_length``: the longest sequence (tokens) training used. Where it exceeds the model's positions (rotary
    positions have no limit), ``max_position_embeddings`` and the tokenizer's ``model_max_length`` are raised to it,
    so transformers neither truncates nor warns on the lengths the model was trained for.

    The result loads with plain ``AutoModelForMaskedLM`` / ``AutoTokenizer`` and converts back with
    ``convert_hf_to_te``. Files are written to a temporary sibling directory that is renamed into place at the end, so
    a crash never leaves a half-written export. A non-empty ``out_dir`` that is not an earlier export is only replaced
    with ``overwrite=True``.
    """
    if source_format not in ("te", "hf"):
        raise ValueError(f"source_format must be 'te' or 'hf', got {source_format!r}")
    target = Path(out_dir)
    check_export_target(target, overwrite)
    if source_format == "te":
        hf_state = convert_te_to_hf(state_dict, config)
    else:  # Round-trip through the TE layout: validates every key and shape and normalises older layouts.
        hf_state = convert_te_to_hf(convert_hf_to_te(state_dict, config), config)
    hf_state.pop(DECODER_KEY)  # Tied to the word embeddings; transformers re-ties it on load.
    tensors = _unshared_cpu_tensors(hf_state)

    esm_config = _export_config(config, tensors, trained_length)

    def write_files(staging: Path) -> None:
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        esm_config.save_pretrained(staging)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.model_max_length = max(tokenizer.model_max_length, esm_config.max_position_embeddings)
        tokenizer.save_pretrained(staging)

    return write_export_folder(target, source_format, write_files, model_card)


def write_export_folder(
    target: Path,
    source_format: str,
    write_files: Callable[[Path], None],
    model_card: str | None,
    format_tag: str = EXPORT_FORMAT_TAG,
) -> Path:
    """Fill a sibling staging folder (`write_files`, the model card, the manifest), then rename it to `target`.

    The manifest's `format_tag` says which family's export this is, so a later export replaces only its own kind.

    A crash never leaves a half-written export: the staging folder is removed and `target` keeps what it had.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        write_files(staging)
        if model_card is not None:
            (staging / "README.md").write_text(model_card)
        manifest = {
            "format": format_tag,
            "source_format": source_format,
            "files": sorted(path.name for path in staging.iterdir()),
        }
        (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def export_final_model(
    state_dict: Mapping[str, torch.Tensor],
    config: Any,
    ckpt_dir: Path,
    tokenizer_dir: str | Path,
    context: DistributedContext,
    model_card: str | None = None,
    trained_length: int | None = None,
) -> Path:
    """The end of training: rank 0 writes ``<ckpt_dir>/final_model`` (see `export_hf_model`), the others wait."""
    out_dir = ckpt_dir / "final_model"
    if context.is_main:
        export_hf_model(
            state_dict,
            config,
            out_dir,
            tokenizer_dir,
            source_format=source_format_of(config),
            overwrite=True,
            model_card=model_card,
            trained_length=trained_length,
        )
        logger.info("Exported the final model to %s (load with AutoModelForMaskedLM.from_pretrained).", out_dir)
    context.barrier()
    return out_dir
