"""AMPLIFY masked language model built from TransformerEngine layers, matching ``modeling_amplify.AMPLIFY``.

The same structure as ``modeling_esm_te`` (and much of its code, reused): a stack of ``te.TransformerLayer``
(pre-RMSNorm, fused QKV, interleaved rotary attention, SwiGLU MLP, no biases) that can run in FP8/NVFP4, a plain
torch embedding, and AMPLIFY's final RMSNorm fused with the decoder into one ``te.LayerNormLinear`` (RMSNorm,
bias). The embedding and the decoder are never quantised: the decoder runs under ``te.autocast(enabled=False)`` and
is built outside ``quantized_model_init``. The vocabulary (27) is padded to ``padded_vocab_size`` (32) rows for
tensor cores; logits are sliced back to 27. One class takes padded ``bshd`` or packed ``thd`` batches
(``config.attn_input_format``).

TE facts this relies on (TransformerEngine 2.x source): ``TransformerLayer(rotary_pos_interleaved=True)`` makes
``MultiheadAttention`` call ``apply_rotary_pos_emb(..., interleaved=True)``, which rotates adjacent pairs
``(2j, 2j+1)`` by the table ``RotaryPositionEmbedding(interleaved=True)`` produces (``[f0, f0, f1, f1, ...]``):
AMPLIFY's complex-number rotary. ``activation="swiglu"`` makes ``fc1_weight`` ``[2 * ffn, hidden]`` with the gated
half first; ``normalization="RMSNorm"`` registers no norm bias, ``bias=False`` no linear biases.

Differences from the reference that remain by design: TE applies RoPE to unscaled queries and scales the scores
(mathematically identical); FP32 GEMMs run on TF32 tensor cores unless ``NVIDIA_TF32_OVERRIDE=0``; attention outputs
at padding positions differ (no loss there).
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformer_engine.pytorch as te
from torch import nn

from convert import rotary_inverse_frequencies, te_vocab_rows
from convert_amplify import convert_amplify_to_te, load_amplify_state_dict
from initialization import _fill_as_unsharded
from modeling_amplify import ROPE_THETA, AMPLIFYConfig, check_supported_config, swiglu_hidden_size
from modeling_esm_te import (
    ATTN_INPUT_FORMATS,
    PARAMS_DTYPES,
    EsmRotaryEmbedding,
    NVEsmEncoder,
    NVEsmModel,
    TEMaskedLM,
    _resolve_device,
    check_layer_plan,
    construction_draws_kept_apart,
    load_te_state_dict,
)
from norm_kernel import check_norm_kernel
from rotary import check_rope_kernel

AMPLIFY_VOCAB_PAD_MULTIPLE = 16


def round_up_amplify_vocab(vocab_size: int) -> int:
    """The TE row count for AMPLIFY's vocabulary: a multiple of 16 (27 -> 32)."""
    return -(-vocab_size // AMPLIFY_VOCAB_PAD_MULTIPLE) * AMPLIFY_VOCAB_PAD_MULTIPLE


class NVAmplifyConfig(AMPLIFYConfig):
    """``AMPLIFYConfig`` plus the TransformerEngine options of :class:`NVAmplifyForMaskedLM`.

    The options mean what they mean in ``modeling_esm_te.NVEsmConfig``: ``attn_input_format`` (``"bshd"`` or
    ``"thd"``), ``fuse_qkv_params``, ``padded_vocab_size`` (embedding/decoder rows; None: no padding),
    ``fp8_layers``/``fp4_layers`` (1-based layer numbers), ``params_dtype``, ``rope_kernel`` and ``norm_kernel``
    (here for RMSNorm). There is no FP32 residual option: ``modeling_esm_te.EsmTransformerLayer`` adds the bias TE
    returns, an empty tensor when ``bias=False``.
    """

    model_type = "nv_amplify"

    def __init__(
        self,
        attn_input_format: str = "bshd",
        fuse_qkv_params: bool = True,
        padded_vocab_size: int | None = 32,
        fp8_layers: list[int] | None = None,
        fp4_layers: list[int] | None = None,
        params_dtype: str = "float32",
        rope_kernel: str = "triton",
        norm_kernel: str = "te",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.attn_input_format = attn_input_format
        self.fuse_qkv_params = fuse_qkv_params
        self.padded_vocab_size = padded_vocab_size
        self.fp8_layers = fp8_layers
        self.fp4_layers = fp4_layers
        self.params_dtype = params_dtype
        self.rope_kernel = rope_kernel
        self.norm_kernel = norm_kernel
        self._validate_te_options()

    def _validate_te_options(self) -> None:
        if self.attn_input_format not in ATTN_INPUT_FORMATS:
            raise ValueError(f"attn_input_format must be one of {ATTN_INPUT_FORMATS}, got {self.attn_input_format!r}")
        if not isinstance(self.fuse_qkv_params, bool):
            raise ValueError(f"fuse_qkv_params must be a bool, got {self.fuse_qkv_params!r}")
        if self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(f"params_dtype must be one of {sorted(PARAMS_DTYPES)}, got {self.params_dtype!r}")
        check_rope_kernel(self.rope_kernel)
        check_norm_kernel(self.norm_kernel)
        rows = self.padded_vocab_size
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < self.vocab_size):
            raise ValueError(
                f"padded_vocab_size must be an int >= vocab_size ({self.vocab_size}) or None, got {rows!r}"
            )
        check_layer_plan(self.num_hidden_layers, self.fp8_layers, self.fp4_layers)

    @classmethod
    def from_amplify_config(cls, config: AMPLIFYConfig, **te_options: Any) -> "NVAmplifyConfig":
        """TE config for a reference (public) AMPLIFY config; TE options of an ``NVAmplifyConfig`` are kept."""
        values = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            values.pop(key, None)
        values.update(te_options)
        return cls.from_dict(values)


def _uniform_init(bound: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """AMPLIFY's initialisation of every linear weight: U(-bound, bound)."""

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.uniform_(tensor, -bound, bound)

    return init_


class AmplifyRotaryEmbedding(EsmRotaryEmbedding):
    """ESM's device- and dtype-safe rotary table in TE's interleaved layout (adjacent pairs share a frequency)."""

    def __init__(self, head_dim: int, base: float, device: torch.device) -> None:
        super().__init__(head_dim, base, device)
        self.interleaved = True


class NVAmplifyEmbeddings(nn.Module):
    """The token embedding (no norm after it); takes the ESM embeddings' arguments so ``NVEsmModel.forward`` fits."""

    def __init__(self, config: NVAmplifyConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            te_vocab_rows(config), config.hidden_size, padding_idx=config.pad_token_id, device=device, dtype=dtype
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        local_cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class NVAmplifyEncoder(NVEsmEncoder):
    """The ``te.TransformerLayer`` stack; FP8/NVFP4 plans and CUDA-graph capture are ``NVEsmEncoder``'s.

    Unlike ESM there is no final norm here: it is fused into the decoder.
    """

    def __init__(
        self, config: NVAmplifyConfig, device: torch.device, dtype: torch.dtype, fp8_weights_recipe: Any = None
    ) -> None:
        nn.Module.__init__(self)  # NVEsmEncoder.__init__ would also build ESM's final LayerNorm
        self.fp8_layers = None if config.fp8_layers is None else frozenset(config.fp8_layers)
        self.fp4_layers = frozenset(config.fp4_layers or ())
        self.layers = nn.ModuleList(
            self._build_layer(config, index + 1, device, dtype, fp8_weights_recipe)
            for index in range(config.num_hidden_layers)
        )
        self.fp8_recipe: Any = None
        self.fp4_recipe: Any = None
        self.fp8_group: Any = None

    def _build_layer(
        self,
        config: NVAmplifyConfig,
        layer_number: int,
        device: torch.device,
        dtype: torch.dtype,
        fp8_weights_recipe: Any,
    ) -> te.TransformerLayer:
        """One AMPLIFY block; under ``quantized_model_init`` when it is an FP8 layer with FP8 primary weights."""
        init_method = _uniform_init(config.decoder_init_range)
        te_device = "meta" if device.type == "meta" else device  # see NVEsmEncoder._build_layer
        in_fp8 = layer_number not in self.fp4_layers and (self.fp8_layers is None or layer_number in self.fp8_layers)
        with te.quantized_model_init(enabled=fp8_weights_recipe is not None and in_fp8, recipe=fp8_weights_recipe):
            return te.TransformerLayer(
                hidden_size=config.hidden_size,
                ffn_hidden_size=swiglu_hidden_size(config.intermediate_size),
                num_attention_heads=config.num_attention_heads,
                layernorm_epsilon=config.norm_eps,
                hidden_dropout=config.dropout_prob,
                attention_dropout=config.dropout_prob,
                init_method=init_method,
                output_layer_init_method=init_method,
                layer_number=layer_number,
                self_attn_mask_type="padding",
                layer_type="encoder",
                attn_input_format=config.attn_input_format,
                fuse_qkv_params=config.fuse_qkv_params,
                rotary_pos_interleaved=True,
                activation="swiglu",
                normalization="RMSNorm",
                bias=False,
                params_dtype=dtype,
                device=te_device,
            )

    def forward(self, hidden_states: torch.Tensor, **layer_kwargs: Any) -> torch.Tensor:
        """Run all layers; the final norm is the decoder's."""
        return self.run_layers(hidden_states, **layer_kwargs)


class NVAmplifyModel(NVEsmModel):
    """Embedding, interleaved rotary table and TE layers (input checks, thd/bshd and graph capture: NVEsmModel's)."""

    def __init__(
        self, config: NVAmplifyConfig, device: torch.device, dtype: torch.dtype, fp8_weights_recipe: Any = None
    ) -> None:
        nn.Module.__init__(self)  # NVEsmModel.__init__ would build ESM's embeddings and contact head
        self.config = config
        self.embeddings = NVAmplifyEmbeddings(config, device, dtype)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_embeddings = AmplifyRotaryEmbedding(head_dim, ROPE_THETA, device)
        self.encoder = NVAmplifyEncoder(config, device, dtype, fp8_weights_recipe)


class NVAmplifyForMaskedLM(TEMaskedLM):
    """AMPLIFY masked LM on TransformerEngine; weights interchange with the public layout via ``convert_amplify``.

    Build with ``device="meta"`` to allocate nothing, shard (e.g. FSDP2), then ``to_empty(device="cuda")`` and
    :meth:`init_weights`. The decoder is not tied to the embedding (AMPLIFY's is a separate ``Linear``).
    """

    def __init__(
        self, config: NVAmplifyConfig, device: torch.device | str | None = None, fp8_weights_recipe: Any = None
    ) -> None:
        super().__init__()
        check_supported_config(config)
        self.config = config
        resolved = _resolve_device(device)
        dtype = PARAMS_DTYPES[config.params_dtype]
        with construction_draws_kept_apart(resolved):  # one seed, the weights of a meta-device build
            self.amplify = NVAmplifyModel(config, resolved, dtype, fp8_weights_recipe)
            self.decoder = te.LayerNormLinear(
                config.hidden_size,
                te_vocab_rows(config),
                eps=config.norm_eps,
                bias=True,
                normalization="RMSNorm",
                init_method=_uniform_init(config.decoder_init_range),
                params_dtype=dtype,
                device="meta" if resolved.type == "meta" else resolved,
            )
        if resolved.type != "meta":
            self.init_weights()

    def set_fp8(self, recipe: Any, fp8_group: Any = None, fp4_recipe: Any = None) -> None:
        """Run the encoder layers in FP8 with this TE recipe (None: no FP8); embedding and decoder never use FP8.

        ``fp4_recipe`` (NVFP4) runs ``config.fp4_layers`` in FP4 instead; ``fp8_group`` reduces amax statistics.
        """
        self.amplify.encoder.fp8_recipe = recipe
        self.amplify.encoder.fp4_recipe = fp4_recipe
        self.amplify.encoder.fp8_group = fp8_group

    def make_cuda_graphs(self, tokens: int, segments: int, max_seqlen: int, autocast_dtype: torch.dtype | None) -> None:
        """Graph the transformer layers for packed batches of one static shape (``NVEsmModel.make_cuda_graphs``)."""
        self.amplify.make_cuda_graphs(tokens, segments, max_seqlen, autocast_dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter in place by AMPLIFY's rule, on any device and under FSDP2 sharding.

        Norm weights 1, decoder bias 0, the embedding U(±embedding_init_range), every other weight
        U(±decoder_init_range); padded vocabulary rows and the padding token's embedding 0. Sharded parameters are
        drawn whole from the identically seeded generator (``initialization._fill_as_unsharded``), so the values do
        not depend on the number of ranks. The rotary frequencies are recomputed.
        """
        embedding = self.amplify.embeddings.word_embeddings.weight
        for name, param in self.named_parameters():
            if isinstance(param, te.QuantizedTensor):  # FP8 primary weights: draw in high precision, then quantise
                values = torch.empty(param.shape, dtype=param.dtype, device=param.device)
                self._init_parameter(name, values, param is embedding)
                param.copy_(values)
            else:
                self._init_parameter(name, param, param is embedding)
        rotary = self.amplify.rotary_embeddings
        head_dim = 2 * rotary.inv_freq.shape[0]
        rotary.inv_freq.copy_(rotary_inverse_frequencies(head_dim, ROPE_THETA))

    def _init_parameter(self, name: str, param: torch.Tensor, is_embedding: bool) -> None:
        config = self.config
        if name.endswith("layer_norm_weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        elif is_embedding:
            _fill_as_unsharded(param, lambda full: self._uniform_rows(full, config.embedding_init_range, True))
        elif name == "decoder.weight":
            _fill_as_unsharded(param, lambda full: self._uniform_rows(full, config.decoder_init_range, False))
        else:
            _fill_as_unsharded(param, lambda full: full.uniform_(-config.decoder_init_range, config.decoder_init_range))

    def _uniform_rows(self, full: torch.Tensor, bound: float, zero_padding_token: bool) -> None:
        full.uniform_(-bound, bound)
        full[self.config.vocab_size :] = 0.0
        if zero_padding_token:
            full[self.config.pad_token_id] = 0.0

    def load_te_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        load_te_state_dict(self, state_dict)

    @classmethod
    def from_amplify_checkpoint(
        cls,
        path: str | Path,
        config: NVAmplifyConfig | None = None,
        device: torch.device | str | None = None,
        **te_options: Any,
    ) -> "NVAmplifyForMaskedLM":
        """The TE model of a public-layout AMPLIFY checkpoint directory (``config.json`` + weights, e.g. an export).

        ``config`` defaults to the checkpoint's own config.json; ``te_options`` (``attn_input_format``...) apply on
        top. Built on meta and materialised once, so nothing is initialised only to be overwritten.
        """
        base = config if config is not None else AMPLIFYConfig.from_pretrained(path)
        config = NVAmplifyConfig.from_amplify_config(base, **te_options)
        te_state = convert_amplify_to_te(load_amplify_state_dict(path, config), config)
        model = cls(config, device="meta")
        model.to_empty(device=_resolve_device(device))
        model.load_te_state_dict(te_state)
        return model

    def backbone(self) -> nn.Module:
        return self.amplify

    def padded_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The decoder (final RMSNorm + linear) in BF16/FP32, whatever autocast surrounds the model."""
        with te.autocast(enabled=False):
            return self.decoder(hidden_states)
