"""AMPLIFY protein masked language model in plain PyTorch: the reference model and the file shipped with exports.

This file imports torch and transformers only, never the recipe: exports copy it next to the weights, and
``AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True)`` loads it on machines that have neither the
recipe nor TransformerEngine. It runs on CPU (``scaled_dot_product_attention``).

Architecture (chandar-lab/AMPLIFY, ``src/amplify/model/amplify.py``): token embedding without a norm after it,
pre-norm encoder blocks (RMSNorm, attention with rotary q/k in the complex/interleaved form, RMSNorm, SwiGLU), a
final RMSNorm and a ``Linear`` decoder with a bias. No biases in attention or FFN, dropout 0.

Weight names, shapes and ``config.json`` keys are those of the public checkpoints (``chandar-lab/AMPLIFY_120M``,
``..._350M``), so a downloaded checkpoint directory loads into :class:`AMPLIFY`:

* ``encoder.weight`` [vocab, hidden]; ``layer_norm_2.weight``; ``decoder.weight`` [vocab, hidden], ``decoder.bias``.
* per layer ``transformer_encoder.{i}.``: ``q``/``k``/``v``/``wo.weight`` [hidden, hidden], ``attention_norm.weight``,
  ``ffn_norm.weight``, ``ffn.w12.weight`` [2 * ffn, hidden] (xformers' packed ``SwiGLU``: rows ``[w1; w2]``, output
  ``silu(x w1ᵀ) * (x w2ᵀ)``, so ``w1`` is the gated half) and ``ffn.w3.weight`` [hidden, ffn].

``ffn`` is ``int(2 * intermediate_size / 3)`` rounded up to a multiple of 8 (1712 for 120M, 2560 for 350M).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

AMPLIFY_MODEL_TYPE = "AMPLIFY"
ROPE_THETA = 10000.0  # fixed in AMPLIFY's rotary.py; the public config.json has no key for it
SWIGLU_MULTIPLE = 8
IGNORE_INDEX = -100


def swiglu_hidden_size(intermediate_size: int) -> int:
    """AMPLIFY's SwiGLU width: 2/3 of the configured FFN size (same parameter count), rounded up to 8."""
    hidden = int(2 * intermediate_size / 3)
    return SWIGLU_MULTIPLE * ((hidden + SWIGLU_MULTIPLE - 1) // SWIGLU_MULTIPLE)


class AMPLIFYConfig(PretrainedConfig):
    """AMPLIFY's configuration with the keys and defaults of the public ``config.json`` (350M by default).

    Keys this implementation does not use (``vocab_path``, ``pre_activation_layer_norm``, ``_name_``...) are kept
    as attributes so that an export writes them back unchanged.
    """

    model_type = AMPLIFY_MODEL_TYPE
    # A declared field: transformers 5 refuses to save undeclared generation-like attributes such as max_length.
    max_length: int = 2048

    def __init__(
        self,
        hidden_size: int = 960,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 15,
        intermediate_size: int = 3840,
        dropout_prob: float = 0.0,
        embedding_init_range: float = 0.02,
        decoder_init_range: float = 0.02,
        rms_norm: bool = True,
        norm_eps: float = 1e-5,
        hidden_act: str = "SwiGLU",
        layer_norm_after_embedding: bool = False,
        layer_norm_before_last_layer: bool = True,
        vocab_size: int = 27,
        ffn_bias: bool = False,
        att_bias: bool = False,
        pad_token_id: int = 0,
        unk_token_id: int = 1,
        mask_token_id: int = 2,
        bos_token_id: int = 3,
        eos_token_id: int = 4,
        other_special_token_ids: list[int] | None = None,
        max_length: int = 2048,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("tie_word_embeddings", False)  # AMPLIFY's decoder has its own weight
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.dropout_prob = dropout_prob
        self.embedding_init_range = embedding_init_range
        self.decoder_init_range = decoder_init_range
        self.rms_norm = rms_norm
        self.norm_eps = norm_eps
        self.hidden_act = hidden_act
        self.layer_norm_after_embedding = layer_norm_after_embedding
        self.layer_norm_before_last_layer = layer_norm_before_last_layer
        self.vocab_size = vocab_size
        self.ffn_bias = ffn_bias
        self.att_bias = att_bias
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.mask_token_id = mask_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.other_special_token_ids = other_special_token_ids
        self.max_length = max_length


# Published variants this implementation does not reproduce: config key -> (required value, what it would mean).
_REQUIRED_ARCHITECTURE = {
    "rms_norm": (True, "LayerNorm instead of RMSNorm"),
    "layer_norm_after_embedding": (False, "a norm after the embedding"),
    "layer_norm_before_last_layer": (True, "no final norm before the decoder"),
    "ffn_bias": (False, "FFN biases"),
    "att_bias": (False, "attention biases"),
}


def check_supported_config(config: Any) -> None:
    """Reject AMPLIFY variants that neither this model nor the TE model implement, naming the key."""
    if str(config.hidden_act).lower() != "swiglu":
        raise ValueError(f"only hidden_act='SwiGLU' is supported, got {config.hidden_act!r}")
    for key, (required, meaning) in _REQUIRED_ARCHITECTURE.items():
        if bool(getattr(config, key)) != required:
            raise ValueError(f"config.{key}={getattr(config, key)!r} ({meaning}) is not supported; expected {required}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) must be divisible by "
            f"num_attention_heads ({config.num_attention_heads})"
        )
    if (config.hidden_size // config.num_attention_heads) % 2:
        raise ValueError("the head dimension must be even for rotary embeddings")


def amplify_state_dict_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a public-layout AMPLIFY checkpoint for ``config``."""
    hidden, vocab, ffn = config.hidden_size, config.vocab_size, swiglu_hidden_size(config.intermediate_size)
    shapes: dict[str, tuple[int, ...]] = {"encoder.weight": (vocab, hidden)}
    for index in range(config.num_hidden_layers):
        prefix = f"transformer_encoder.{index}."
        for name in ("q", "k", "v", "wo"):
            shapes[f"{prefix}{name}.weight"] = (hidden, hidden)
        shapes[prefix + "attention_norm.weight"] = (hidden,)
        shapes[prefix + "ffn_norm.weight"] = (hidden,)
        shapes[prefix + "ffn.w12.weight"] = (2 * ffn, hidden)
        shapes[prefix + "ffn.w3.weight"] = (hidden, ffn)
    shapes.update({"layer_norm_2.weight": (hidden,), "decoder.weight": (vocab, hidden), "decoder.bias": (vocab,)})
    return shapes


class CheckpointKeysError(KeyError):
    """A KeyError whose message prints as written (KeyError's own str() shows the repr of its argument)."""

    def __str__(self) -> str:
        return str(self.args[0])


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    what: str,
    optional: frozenset[str] = frozenset(),
) -> None:
    """One clear error for the first disagreement between a state dict and the layout its config implies.

    Shape mismatches come first (they name the tensor, its shape and the expected one), then missing keys, then
    unexpected ones.
    """
    wrong = [key for key in expected if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key])]
    if wrong:
        key = wrong[0]
        others = f" ({len(wrong) - 1} more tensors disagree too)" if len(wrong) > 1 else ""
        raise ValueError(
            f"{what}: tensor {key!r} has shape {tuple(state_dict[key].shape)}, expected {tuple(expected[key])} "
            f"from the config{others}; the checkpoint and its config.json describe different models"
        )
    missing = [key for key in expected if key not in state_dict and key not in optional]
    if missing:
        raise CheckpointKeysError(
            f"{what}: missing {len(missing)} tensor(s), first {missing[:3]}; is this the right format?"
        )
    unexpected = [key for key in state_dict if key not in expected]
    if unexpected:
        raise CheckpointKeysError(
            f"{what}: {len(unexpected)} unexpected tensor(s), first {unexpected[:3]}; does num_hidden_layers "
            "match the checkpoint, and are wrapper prefixes such as 'module.' stripped?"
        )


def rotary_frequencies(head_dim: int, seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[seq_len, head_dim / 2]`` complex rotations ``exp(i * position * theta^(-2j/d))``, as AMPLIFY computes them."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``[B, S, heads, head_dim]`` in float32, adjacent pairs ``(2j, 2j+1)`` as complex numbers."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3).type_as(x)


class AMPLIFYRMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the scale, as AMPLIFY's ``rmsnorm.py`` does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class AMPLIFYSwiGLU(nn.Module):
    """xformers' packed SwiGLU: ``w12`` holds ``[w1; w2]``, ``w3(silu(x w1ᵀ) * x w2ᵀ)``."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(hidden_size, 2 * ffn_size, bias=False)
        self.w3 = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class AMPLIFYEncoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, config: AMPLIFYConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, hidden // config.num_attention_heads
        self.dropout = config.dropout_prob
        self.q, self.k, self.v, self.wo = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.attention_norm = AMPLIFYRMSNorm(hidden, config.norm_eps)
        self.ffn_norm = AMPLIFYRMSNorm(hidden, config.norm_eps)
        self.ffn = AMPLIFYSwiGLU(hidden, swiglu_hidden_size(config.intermediate_size))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, freqs: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(self._attention(self.attention_norm(x), mask, freqs), self.dropout, self.training)
        return x + F.dropout(self.ffn(self.ffn_norm(x)), self.dropout, self.training)

    def _attention(self, x: torch.Tensor, mask: torch.Tensor | None, freqs: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        query, key, value = (
            proj(x).view(batch, seq, self.num_heads, self.head_dim) for proj in (self.q, self.k, self.v)
        )
        query, key = apply_rotary(query, freqs), apply_rotary(key, freqs)
        attended = F.scaled_dot_product_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.wo(attended.transpose(1, 2).reshape(batch, seq, -1))


def attention_mask_for_sdpa(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``[B, 1, 1, S]`` mask for SDPA from an ``[B, S]`` mask.

    Integer or boolean masks follow transformers (1 = real token); floating masks are AMPLIFY's additive pad mask
    (0 = keep, -inf = padding), which AMPLIFY's own forward takes.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    if attention_mask.is_floating_point():
        if bool((attention_mask > 0).any()):
            raise ValueError(
                "a floating attention_mask is read as AMPLIFY's additive mask (0 keep, -inf pad) but this one has "
                "positive entries; pass a 1/0 mask as an integer or bool tensor"
            )
        return attention_mask[:, None, None, :].to(dtype)
    return attention_mask.bool()[:, None, None, :]


class AMPLIFYPreTrainedModel(PreTrainedModel):
    """Initialisation as AMPLIFY: U(±decoder_init_range) linear weights, U(±embedding_init_range) embeddings.

    Unlike AMPLIFY (whose uniform draw overwrites it) the padding row of the embedding is zeroed; it never receives
    a gradient, and its value only reaches padding positions.
    """

    config_class = AMPLIFYConfig
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = ["AMPLIFYEncoderBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.weight.uniform_(-self.config.decoder_init_range, self.config.decoder_init_range)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.uniform_(-self.config.embedding_init_range, self.config.embedding_init_range)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, AMPLIFYRMSNorm):
            module.weight.fill_(1.0)


class AMPLIFY(AMPLIFYPreTrainedModel):
    """AMPLIFY masked LM with the public checkpoints' module names (no prefix: ``encoder``, ``transformer_encoder``).

    ``forward`` takes transformers-style inputs (``input_ids``, ``attention_mask`` 1 = real token, ``labels`` with
    -100 ignored) and returns a ``MaskedLMOutput`` with the float32 mean cross-entropy when labels are given.
    """

    def __init__(self, config: AMPLIFYConfig) -> None:
        super().__init__(config)
        check_supported_config(config)
        self.encoder = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.transformer_encoder = nn.ModuleList(AMPLIFYEncoderBlock(config) for _ in range(config.num_hidden_layers))
        self.layer_norm_2 = AMPLIFYRMSNorm(config.hidden_size, config.norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        """Logits ``[B, S, vocab]``; ``hidden_states`` (embedding output, then every block) when asked."""
        hidden = self.encoder(input_ids)
        mask = attention_mask_for_sdpa(attention_mask, hidden.dtype)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        freqs = rotary_frequencies(head_dim, input_ids.shape[1], device=input_ids.device)
        all_hidden = [hidden]
        for block in self.transformer_encoder:
            hidden = block(hidden, mask, freqs)
            all_hidden.append(hidden)
        logits = self.decoder(self.layer_norm_2(hidden))
        loss = None
        if labels is not None:
            flat = logits.float().reshape(-1, self.config.vocab_size)
            loss = F.cross_entropy(flat, labels.reshape(-1).to(flat.device), ignore_index=IGNORE_INDEX)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=tuple(all_hidden) if output_hidden_states else None
        )


AMPLIFYForMaskedLM = AMPLIFY  # the name transformers' naming convention expects; the public checkpoints use AMPLIFY
