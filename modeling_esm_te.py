"""ESM-2 masked language model built from TransformerEngine layers, matching transformers' ESM (see the notes below).

The encoder is a stack of ``te.TransformerLayer`` (pre-LayerNorm, fused QKV, rotary attention, GELU MLP) that can
run in FP8; embeddings and the LM head are plain torch modules so that they always stay in BF16/FP32 (FP8 there
underflows) and follow FSDP mixed precision like any other module. The same class takes padded ``bshd`` batches or
packed ``thd`` batches, chosen by ``config.attn_input_format``.

Weights convert to and from transformers' ``EsmForMaskedLM`` with ``convert.py``. Differences from transformers that
remain by design:

* TE's ``"gelu"`` MLP activation is the tanh approximation (its fused kernels, the cuBLAS GELU epilogue and the
  JIT bias-GELU all use ``0.5x(1+tanh(0.7979x(1+0.0447x²)))``), while ESM uses the exact erf GELU. The two differ by
  at most 4.7e-4 in absolute value (near |x| = 2.7), about 2e-4 in relative L2 on unit-scale activations: far below
  BF16 resolution (3.9e-3). In true FP32 it shows as 1.7e-4 (8M) / 3.6e-4 (650M) relative L2 logit error against
  transformers on an H100; with the GELU flavour matched the rest agrees to ~1e-6. TE offers no erf GELU in
  ``TransformerLayer``. The LM head's GELU is plain torch and exact.
* TE runs FP32 GEMMs on TF32 tensor cores (torch's ``allow_tf32`` flags do not apply; ``NVIDIA_TF32_OVERRIDE=0``
  does), so "FP32" TE logits differ from transformers by ~6e-4 (8M) / ~9e-4 (650M). Training runs in BF16 anyway.
* transformers scales queries by 1/sqrt(head_dim) before RoPE and uses softmax scale 1; TE applies RoPE to unscaled
  queries and uses softmax scale 1/sqrt(head_dim). RoPE is linear, so the two are mathematically identical.
* Attention outputs at padding positions differ (TE masks padded queries too); those positions carry no loss.
"""

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformer_engine.pytorch as te
from torch import nn
from transformers import EsmConfig
from transformers.modeling_outputs import MaskedLMOutput

from collator import IGNORE_INDEX
from context_parallel import masked_fraction
from convert import (
    EXTRA_STATE_SUFFIX,
    convert_hf_to_te,
    load_hf_state_dict,
    rope_base,
    rotary_inverse_frequencies,
    round_up_vocab,
    te_vocab_rows,
)
from initialization import NOT_AN_EMBEDDING, embedding_paddings, init_parameter_
from norm_kernel import check_norm_kernel, select_norm_kernel
from rotary import PackedRotary, check_rope_kernel, packed_rotary, route_te_rope

# ESM-2 masked 15% of tokens and replaced 80% of those with <mask>; token dropout rescales embeddings by this ratio.
MASK_RATIO_TRAIN = 0.15 * 0.8
PARAMS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_INPUT_FORMATS = ("bshd", "thd")

route_te_rope()  # layers given a rotary.PackedRotary run the recipe's packed RoPE kernel, others TE's


def check_layer_plan(num_layers: int, fp8_layers: list[int] | None, fp4_layers: list[int] | None) -> None:
    """Reject an FP8/NVFP4 layer plan that names a layer the model lacks, twice, or in both formats."""
    for key, layers in (("fp8_layers", fp8_layers), ("fp4_layers", fp4_layers)):
        if layers is None:
            continue
        if any(isinstance(n, bool) or not isinstance(n, int) or n not in range(1, num_layers + 1) for n in layers):
            raise ValueError(f"{key} must list 1-based layer numbers in 1..{num_layers}, got {layers}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"{key} lists a layer more than once: {layers}")
    if fp8_layers is not None and fp4_layers is not None and set(fp8_layers) & set(fp4_layers):
        raise ValueError(f"fp8_layers {fp8_layers} and fp4_layers {fp4_layers} share layers")


class NVEsmConfig(EsmConfig):
    """``EsmConfig`` plus the TransformerEngine options of :class:`NVEsmForMaskedLM`.

    Attributes:
        attn_input_format: ``"bshd"`` for padded ``[batch, seq]`` batches, ``"thd"`` for packed sequences with
            ``cu_seqlens``. TE layers are built for one format, so it is a config option rather than a call argument.
        fuse_qkv_params: one fused QKV weight per layer (TE's per-head interleaved layout) instead of three.
        padded_vocab_size: rows of the embedding and LM decoder (real vocab rounded up to a multiple of 64 for
            tensor cores); None means no padding. Logits are always sliced back to ``vocab_size``.
        fp8_layers: 1-based layer numbers that run in FP8 once ``set_fp8`` is given a recipe; None means all layers
            not in ``fp4_layers``.
        fp4_layers: 1-based layer numbers that run in NVFP4 once ``set_fp8`` is given an FP4 recipe (None: none).
        params_dtype: dtype parameters are created in (``"float32"``, ``"bfloat16"`` or ``"float16"``).
        fp32_residual_connection: keep the residual stream between and inside the layers in FP32 while the layers
            compute in BF16, as transformers' ESM does under ``torch.autocast``. ``te.TransformerLayer`` otherwise
            casts it to the compute dtype, which rounds every residual add to BF16: the gradients then drift further
            from FP32 (measured at 650M in tests/test_modeling_te_gpu.py), at a small cost in speed and memory.
        rope_kernel: RoPE of packed (thd) batches: ``"triton"`` (``rotary.py``: positions computed once per batch,
            one tiled kernel per tensor) or ``"te"`` (TE's fused THD kernel). Padded batches and context parallelism
            always use TE's.
        gelu_in_gemm: in BF16, compute the MLP's bias + GELU in the FC1 GEMM's cuBLAS epilogue and its gradient in
            the FC2 data-gradient GEMM's, instead of TE's separate compiled bias-GELU kernels (TE's default while
            ``use_reentrant`` recompute is on). FP8 layers are unaffected (TE fuses GELU with the cast there).
        norm_kernel: ``"te"`` (TE's LayerNorm kernels) or ``"cudnn"`` (cuDNN's), forward and backward; set at the
            start of every forward (``norm_kernel.py``: TE's switch is process-wide).

    """

    model_type = "nv_esm"

    attn_input_format: str = "bshd"
    fuse_qkv_params: bool = True
    padded_vocab_size: int | None = 64
    fp8_layers: list[int] | None = None
    fp4_layers: list[int] | None = None
    params_dtype: str = "float32"
    fp32_residual_connection: bool = False
    rope_kernel: str = "triton"
    gelu_in_gemm: bool = True
    norm_kernel: str = "te"

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._validate_te_options()

    def _validate_te_options(self) -> None:
        if self.attn_input_format not in ATTN_INPUT_FORMATS:
            raise ValueError(f"attn_input_format must be one of {ATTN_INPUT_FORMATS}, got {self.attn_input_format!r}")
        for flag in ("fuse_qkv_params", "fp32_residual_connection", "gelu_in_gemm"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        check_rope_kernel(self.rope_kernel)
        check_norm_kernel(self.norm_kernel)
        if self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(f"params_dtype must be one of {sorted(PARAMS_DTYPES)}, got {self.params_dtype!r}")
        if self.padded_vocab_size is not None:
            if not isinstance(self.padded_vocab_size, int) or isinstance(self.padded_vocab_size, bool):
                raise ValueError(f"padded_vocab_size must be an int or None, got {self.padded_vocab_size!r}")
            if self.vocab_size is not None and self.padded_vocab_size < self.vocab_size:
                raise ValueError(
                    f"padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size ({self.vocab_size}); use "
                    f"{round_up_vocab(self.vocab_size)} (vocab rounded up to a multiple of 64) or None"
                )
        check_layer_plan(self.num_hidden_layers, self.fp8_layers, self.fp4_layers)

    @classmethod
    def from_esm_config(cls, esm_config: EsmConfig, **te_options: Any) -> "NVEsmConfig":
        """TE config for a transformers ESM config; ``padded_vocab_size`` defaults to the vocab rounded up to 64."""
        values = esm_config.to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            values.pop(key, None)
        values.setdefault("padded_vocab_size", round_up_vocab(esm_config.vocab_size))  # kept if already an NVEsmConfig
        values.update(te_options)
        return cls.from_dict(values)


def _check_supported_architecture(config: NVEsmConfig) -> None:
    """Reject ESM variants this implementation does not reproduce (ESM-1 style absolute positions, decoders...)."""
    if config.position_embedding_type != "rotary":
        raise ValueError(f"only rotary position embeddings are supported, got {config.position_embedding_type!r}")
    if config.emb_layer_norm_before:
        raise ValueError("emb_layer_norm_before=True (ESM-1b) is not supported; ESM-2 has no embedding LayerNorm")
    if config.is_decoder or config.add_cross_attention:
        raise ValueError("ESM-2 is an encoder; is_decoder/add_cross_attention must be False")
    if not config.tie_word_embeddings:
        raise ValueError("the LM decoder is always tied to the word embeddings; tie_word_embeddings must be True")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) must be divisible by "
            f"num_attention_heads ({config.num_attention_heads})"
        )


def _resolve_device(device: torch.device | str | None) -> torch.device:
    """TE layers live on CUDA; None means the current CUDA device (TE would otherwise allocate on the CPU)."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def construction_draws_kept_apart(device: torch.device) -> AbstractContextManager:
    """Around building the modules in place: what they draw for themselves leaves the random generators untouched.

    Built in place, TE's layers and torch's embeddings and linear layers draw their own initial values, which
    ``init_weights`` then replaces; built on the meta device (FSDP2, Megatron-FSDP), nothing is drawn before
    ``init_weights``. Without this the two started ``init_weights`` from different generator states, so one seed
    gave DDP other initial weights than FSDP2.
    """
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """ESM initialisation for every linear weight, including output projections (no depth scaling)."""

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


class EsmRotaryEmbedding(te.attention.RotaryPositionEmbedding):
    """TE's rotary embedding with ``inv_freq`` created on the model's device and kept in float32.

    TE allocates ``inv_freq`` on the current CUDA device whatever the model's device, which would break allocation-free
    meta construction; and a ``model.to(torch.bfloat16)`` would cast it, after which TE builds the position ramp in
    BF16, where integers above 256 are not representable.
    """

    def __init__(self, head_dim: int, base: float, device: torch.device) -> None:
        super().__init__(head_dim, rotary_base=base)
        self.inv_freq = rotary_inverse_frequencies(head_dim, base).to(device)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "EsmRotaryEmbedding":
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.inv_freq.float()
        return self


class NVEsmEmbeddings(nn.Module):
    """Word embeddings with ESM-2's token-dropout rescaling, exactly as transformers computes it.

    Under context parallelism (``cp_group`` set) a packed shard holds only part of each sequence: its per-sequence
    mask counts are summed over the CP group, so the rescaling is that of the whole sequence.
    """

    cp_group: Any = None  # the context-parallel process group (NVEsmModel.set_context_parallel), or None

    def __init__(self, config: NVEsmConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            te_vocab_rows(config), config.hidden_size, padding_idx=config.pad_token_id, device=device, dtype=dtype
        )
        self.token_dropout = bool(config.token_dropout)
        self.mask_token_id = config.mask_token_id

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        local_cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed ``[B, S]`` ids (with optional ``attention_mask``) or packed ``[T]`` ids (with ``cu_seqlens``).

        ``local_cu_seqlens``: a context-parallel shard's own boundaries of each sequence (``cu_seqlens`` then holds
        the whole sequences' real lengths).
        """
        embeddings = self.word_embeddings(input_ids)
        if self.token_dropout:
            is_mask = input_ids == self.mask_token_id
            embeddings = embeddings.masked_fill(is_mask.unsqueeze(-1), 0.0)
            if cu_seqlens is None:
                lengths = attention_mask.sum(-1) if attention_mask is not None else input_ids.shape[-1]
                observed_ratio = (is_mask.sum(-1).float() / lengths)[:, None, None]
            elif local_cu_seqlens is None:
                observed_ratio = masked_fraction(is_mask, cu_seqlens, cu_seqlens)[:, None]
            else:
                observed_ratio = masked_fraction(is_mask, local_cu_seqlens, cu_seqlens, self._sum_over_cp)[:, None]
            embeddings = (embeddings * (1 - MASK_RATIO_TRAIN) / (1 - observed_ratio)).to(embeddings.dtype)
        if attention_mask is not None:
            embeddings = (embeddings * attention_mask.unsqueeze(-1)).to(embeddings.dtype)
        return embeddings

    def _sum_over_cp(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-sequence mask counts summed over the CP group, on the device (no host sync)."""
        if self.cp_group is None:
            raise ValueError("local_cu_seqlens given but no CP group set: call NVEsmModel.set_context_parallel")
        dist.all_reduce(counts, group=self.cp_group)
        return counts


class EsmTransformerLayer(te.TransformerLayer):
    """``te.TransformerLayer`` that can keep its residual stream in FP32 (``config.fp32_residual_connection``).

    Under ``torch.autocast`` TE casts the layer input, and with it the residual, to BF16. With the option on, the two
    residual adds run here in FP32 and only the inputs of TE's fused LayerNorm+GEMM modules are BF16; the
    parameters, their names and the kernels are the same as ``te.TransformerLayer``'s, so checkpoints interchange.
    """

    def __init__(self, *, fp32_residual_connection: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fp32_residual_connection = fp32_residual_connection

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if not self.fp32_residual_connection:
            return super().forward(hidden_states, **kwargs)
        # MultiheadAttention's own default mask type is causal; the layer's is the one it was built with (padding).
        kwargs["attn_mask_type"] = kwargs.pop("self_attn_mask_type", None) or self.self_attn_mask_type
        residual = hidden_states.float()
        attention, attention_bias = self.self_attention(self._compute_input(residual), **kwargs)
        residual = residual + self._dropout(attention + attention_bias)
        mlp, mlp_bias = self.layernorm_mlp(self._compute_input(residual))
        return residual + self._dropout(mlp + mlp_bias)

    def _compute_input(self, residual: torch.Tensor) -> torch.Tensor:
        """What TE's modules take: FP32 under autocast (they cast it themselves), else the parameters' dtype."""
        if torch.is_autocast_enabled():
            return residual
        return residual.to(self.layernorm_mlp.layer_norm_weight.dtype)

    def _dropout(self, tensor: torch.Tensor) -> torch.Tensor:
        return F.dropout(tensor, p=self.hidden_dropout, training=self.training)


class StaticShapeLayers(nn.Module):
    """Consecutive transformer layers called with tensors only, as CUDA-graph capture needs, captured as one graph.

    Its inputs are the packed hidden states, ``cu_seqlens`` and the rotary tensors: TE's frequency table, or the
    three tensors of a ``rotary.PackedRotary``. The fixed ``max_seqlen`` of static batches is an attribute.

    One graph per run of layers, not per layer: a replay first copies its inputs into the graph's own buffers, and the
    backward its output gradient, so graphs of single layers copied every layer's hidden states, their gradient and
    the rotary tensors once more per step (~400 device copies and as many host calls per step, 2.6% of the GPU time
    of AMPLIFY 350M's FP8 step on an H100, 2026-12-07).
    """

    def __init__(self, layers: list[nn.Module], max_seqlen: int) -> None:
        super().__init__()
        self.layers, self.max_seqlen = nn.ModuleList(layers), max_seqlen

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, *rotary: torch.Tensor) -> torch.Tensor:
        rotary_pos_emb = rotary[0] if len(rotary) == 1 else PackedRotary(*rotary)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=None,
                rotary_pos_emb=rotary_pos_emb,
                cu_seqlens_q=cu_seqlens,
                cu_seqlens_kv=cu_seqlens,
                max_seqlen_q=self.max_seqlen,
                max_seqlen_kv=self.max_seqlen,
            )
        return hidden_states


def unwrap_capture_autocast() -> None:
    """Give ``StaticShapeLayers`` back its own ``__call__`` after a capture, also one that failed.

    TE's ``make_graphed_callables`` replaces the class's ``__call__`` by one that enters its FP8 autocast for the
    modules being captured (disabled for any other), and restores it only when the capture succeeds. After a capture
    that raised (out of memory, say) every later capture in the process would then run with FP8 off: a benchmark
    session after an OOM one measured FP8 at exactly the BF16 speed (H100, 2026-12-07).
    """
    if "__call__" in StaticShapeLayers.__dict__:
        del StaticShapeLayers.__call__


def rotary_tensors(rotary: Any) -> tuple[torch.Tensor, ...]:
    """The tensors ``StaticShapeLayers`` takes for the layers' ``rotary_pos_emb``."""
    return rotary.tensors() if isinstance(rotary, PackedRotary) else (rotary,)


class NVEsmEncoder(nn.Module):
    """The ``te.TransformerLayer`` stack and ESM-2's final LayerNorm; FP8 applies inside this module only."""

    def __init__(
        self, config: NVEsmConfig, device: torch.device, dtype: torch.dtype, fp8_weights_recipe: Any = None
    ) -> None:
        super().__init__()
        self.fp8_layers = None if config.fp8_layers is None else frozenset(config.fp8_layers)
        self.fp4_layers = frozenset(config.fp4_layers or ())
        self.layers = nn.ModuleList(
            self._build_layer(config, index + 1, device, dtype, fp8_weights_recipe)
            for index in range(config.num_hidden_layers)
        )
        self.emb_layer_norm_after = nn.LayerNorm(
            config.hidden_size, eps=config.layer_norm_eps, device=device, dtype=dtype
        )
        self.fp8_recipe: Any = None
        self.fp4_recipe: Any = None
        self.fp8_group: Any = None

    def _build_layer(
        self, config: NVEsmConfig, layer_number: int, device: torch.device, dtype: torch.dtype, fp8_weights_recipe: Any
    ) -> EsmTransformerLayer:
        """One TE layer, built under TE's quantized_model_init when it is an FP8 layer with FP8 primary weights.

        Such a layer holds its GEMM weights in FP8 only: the optimizer step quantises them, not every forward.
        """
        init_method = _normal_init(config.initializer_range)
        # TE defers initialisation only when `device == "meta"` compares equal, which a torch.device never does with a
        # str; given torch.device("meta") it would materialise every weight on the GPU.
        te_device = "meta" if device.type == "meta" else device
        in_fp8 = layer_number not in self.fp4_layers and (self.fp8_layers is None or layer_number in self.fp8_layers)
        quantized = fp8_weights_recipe is not None and in_fp8
        with te.quantized_model_init(enabled=quantized, recipe=fp8_weights_recipe):
            layer = EsmTransformerLayer(
                fp32_residual_connection=config.fp32_residual_connection,
                hidden_size=config.hidden_size,
                ffn_hidden_size=config.intermediate_size,
                num_attention_heads=config.num_attention_heads,
                layernorm_epsilon=config.layer_norm_eps,
                hidden_dropout=config.hidden_dropout_prob or 0.0,
                attention_dropout=config.attention_probs_dropout_prob or 0.0,
                init_method=init_method,
                output_layer_init_method=init_method,
                layer_number=layer_number,
                self_attn_mask_type="padding",
                layer_type="encoder",
                attn_input_format=config.attn_input_format,
                fuse_qkv_params=config.fuse_qkv_params,
                activation="gelu",
                normalization="LayerNorm",
                bias=True,
                params_dtype=dtype,
                device=te_device,
            )
        layer.layernorm_mlp.bias_gelu_nvfusion = not config.gelu_in_gemm  # TE reads it in every BF16 forward
        return layer

    @property
    def outer_recipe(self) -> Any:
        """The recipe of the autocast around all layers: FP8's, else NVFP4's (each layer may override it)."""
        return self.fp8_recipe if self.fp8_recipe is not None else self.fp4_recipe

    def layer_recipe(self, layer_number: int) -> Any:
        """The TE recipe this layer runs in (its plan entry), or None for BF16."""
        if self.fp4_recipe is not None and layer_number in self.fp4_layers:
            return self.fp4_recipe
        if self.fp8_recipe is not None and (self.fp8_layers is None or layer_number in self.fp8_layers):
            return None if layer_number in self.fp4_layers else self.fp8_recipe
        return None

    def _layer_precision(self, layer_number: int) -> AbstractContextManager:
        """Override the outer autocast for a layer whose plan entry differs: BF16, or NVFP4 inside an FP8 run."""
        recipe, outer = self.layer_recipe(layer_number), self.outer_recipe
        if recipe is outer:
            return nullcontext()
        if recipe is None:
            return te.autocast(enabled=False, recipe=outer)
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=self.fp8_group)

    def layer_uses_fp8(self, layer_number: int) -> bool:
        """Whether the layer runs quantised (FP8 or NVFP4) under the outer recipe, as CUDA graphs capture it."""
        return self.layer_recipe(layer_number) is not None

    def precision_runs(self) -> list[list[nn.Module]]:
        """The layers as runs of consecutive layers under one recipe (one run unless the plan mixes precisions)."""
        runs = itertools.groupby(self.layers, key=lambda layer: self.layer_recipe(layer.layer_number))
        return [list(run) for _, run in runs]

    def make_cuda_graphs(self, sample_args: tuple[tuple[torch.Tensor, ...], ...], max_seqlen: int) -> None:
        """Capture the training forward and backward of each of ``precision_runs`` in CUDA graphs (TE's capture).

        ``sample_args`` holds (input, cu_seqlens, rotary tensors...) per run. Training forwards of packed batches
        shaped like them then replay the graphs, FP8 scaling state included; eval-mode forwards run the layers eagerly.
        Parameters must not be replaced afterwards.
        """
        runs = self.precision_runs()
        graphed = [StaticShapeLayers(run, max_seqlen) for run in runs]
        try:
            te.make_graphed_callables(
                tuple(graphed),
                sample_args,
                enabled=tuple(self.layer_uses_fp8(run[0].layer_number) for run in runs),
                recipe=self.outer_recipe,
                amax_reduction_group=self.fp8_group,
            )
        finally:  # see unwrap_capture_autocast
            unwrap_capture_autocast()
        self.__dict__["graphed_runs"] = graphed  # not submodules: the state dict keeps the layers' own names

    def forward(self, hidden_states: torch.Tensor, **layer_kwargs: Any) -> torch.Tensor:
        """Run all layers (``layer_kwargs`` go to every ``TransformerLayer``) and the final LayerNorm."""
        hidden_states = self.run_layers(hidden_states, **layer_kwargs)
        final_norm = self.emb_layer_norm_after
        if not torch.is_autocast_enabled():  # an FP32 residual stream meets BF16 weights
            hidden_states = hidden_states.to(final_norm.weight.dtype)
        return final_norm(hidden_states)

    def run_layers(self, hidden_states: torch.Tensor, **layer_kwargs: Any) -> torch.Tensor:
        """The layer stack under its precision plan; in training, the captured graphs once there are any."""
        graphed = self.__dict__.get("graphed_runs") if self.training else None
        outer = self.outer_recipe
        with te.autocast(enabled=outer is not None, recipe=outer, amax_reduction_group=self.fp8_group):
            if graphed is not None:
                args = (layer_kwargs["cu_seqlens_q"], *rotary_tensors(layer_kwargs["rotary_pos_emb"]))
                for run in graphed:
                    with self._layer_precision(run.layers[0].layer_number):
                        hidden_states = run(hidden_states, *args)
                return hidden_states
            for layer in self.layers:
                with self._layer_precision(layer.layer_number):
                    hidden_states = layer(hidden_states, **layer_kwargs)
        return hidden_states


class EsmContactHeadWeights(nn.Module):
    """ESM-2's contact-regression weights, kept as buffers (never trained here) so checkpoints round-trip exactly."""

    def __init__(self, config: NVEsmConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        features = config.num_hidden_layers * config.num_attention_heads
        self.register_buffer("regression_weight", torch.empty(1, features, device=device, dtype=dtype))
        self.register_buffer("regression_bias", torch.empty(1, device=device, dtype=dtype))


class NVEsmModel(nn.Module):
    """ESM-2 encoder: embeddings with token dropout, rotary TE layers, final LayerNorm.

    The input checks, the bshd/thd handling, graph capture and context parallelism serve AMPLIFY's backbone too (it
    subclasses this).
    """

    cp_size: int = 1  # ranks of the context-parallel group (set_context_parallel); 1: whole sequences here

    def __init__(
        self, config: NVEsmConfig, device: torch.device, dtype: torch.dtype, fp8_weights_recipe: Any = None
    ) -> None:
        super().__init__()
        self.config = config
        self.embeddings = NVEsmEmbeddings(config, device, dtype)
        self.rotary_embeddings = EsmRotaryEmbedding(
            config.hidden_size // config.num_attention_heads, rope_base(config), device
        )
        self.encoder = NVEsmEncoder(config, device, dtype, fp8_weights_recipe)
        self.contact_head = EsmContactHeadWeights(config, device, dtype)

    def make_cuda_graphs(self, tokens: int, segments: int, max_seqlen: int, autocast_dtype: torch.dtype | None) -> None:
        """Graph the transformer layers for packed batches of one static shape (collator.StaticPacking).

        ``tokens`` per batch, ``segments`` entries of ``cu_seqlens`` minus one, ``max_seqlen`` fixed; capture runs
        under ``autocast_dtype`` autocast (as the training forward does; None: none) on random inputs, and leaves
        the weights, the gradients and TE's FP8 scaling state as they were.
        """
        if self.config.attn_input_format != "thd":
            raise ValueError("CUDA graphs need packed (thd) batches of a static shape; build the model with 'thd'")
        weight = self.embeddings.word_embeddings.weight
        bounds = torch.linspace(0, tokens, min(segments, -(-tokens // max_seqlen)) + 1).round().to(torch.int32)
        cu_seqlens = torch.full((segments + 1,), tokens, dtype=torch.int32)
        cu_seqlens[: len(bounds)] = bounds
        cu_seqlens = cu_seqlens.to(weight.device)
        rotary = rotary_tensors(self.packed_rotary(cu_seqlens, tokens, max_seqlen))
        # What each run of layers is given in training: the embeddings' output, then the previous run's (the compute
        # dtype, or FP32 with an FP32 residual stream, an ESM-2-only option).
        fp32_residual = getattr(self.config, "fp32_residual_connection", False)
        between = torch.float32 if fp32_residual else (autocast_dtype or weight.dtype)
        dtypes = [weight.dtype] + [between] * (len(self.encoder.precision_runs()) - 1)
        sample_args = tuple(
            (
                torch.randn(tokens, self.config.hidden_size, device=weight.device, dtype=dtype, requires_grad=True),
                cu_seqlens,
                *rotary,
            )
            for dtype in dtypes
        )
        context = torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False) if autocast_dtype else nullcontext()
        select_norm_kernel(self.config.norm_kernel)  # the graphs keep the normalization kernels chosen now
        with context:
            self.encoder.make_cuda_graphs(sample_args, max_seqlen)

    def packed_rotary(self, cu_seqlens: torch.Tensor, tokens: int, max_seqlen: int) -> Any:
        """The layers' ``rotary_pos_emb`` for a packed batch: per ``config.rope_kernel``, the recipe's or TE's.

        Under context parallelism always TE's table: its fused RoPE reads each chunk's rows of the whole sequence's
        table at their true offsets, from ``cu_seqlens_padded`` and the CP rank.
        """
        if self.config.rope_kernel == "te" or self.cp_size > 1:
            return self.rotary_embeddings(max_seqlen)
        return packed_rotary(self.rotary_embeddings.inv_freq, cu_seqlens, tokens, max_seqlen)

    def set_context_parallel(
        self, cp_group: Any, cp_global_ranks: list[int], cp_stream: torch.cuda.Stream, cp_comm_type: str = "p2p"
    ) -> None:
        """Split every packed sequence over ``cp_group``: TE's attention exchanges keys and values within it.

        Each layer gets the group (``te.TransformerLayer.set_context_parallel_group``; ``cp_comm_type`` "p2p" is
        TE's ring exchange, "all_gather" or "a2a" its alternatives) and the embeddings reduce their token-dropout
        counts over it. Forward then takes a shard of ``context_parallel.shard_collated_batch``: the rank's chunks
        with the whole batch's ``cu_seqlens``, ``cu_seqlens_padded`` and ``max_seqlen``, and its ``local_cu_seqlens``.
        """
        if self.config.attn_input_format != "thd":
            raise ValueError("context parallelism splits packed (thd) batches; build the model with 'thd'")
        self.cp_size = dist.get_world_size(cp_group)
        for layer in self.encoder.layers:
            layer.set_context_parallel_group(cp_group, cp_global_ranks, cp_stream, cp_comm_type)
        self.embeddings.cp_group = cp_group  # token-dropout counts (ESM-2; AMPLIFY's embedding has none)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cu_seqlens_padded: torch.Tensor | None = None,
        local_cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[B, S, H]`` (bshd) or ``[T, H]`` (thd); see ``NVEsmForMaskedLM.forward`` for inputs.

        Under context parallelism (thd only) also ``cu_seqlens_padded`` and ``local_cu_seqlens`` (see
        ``set_context_parallel``); ``max_seqlen`` is then the longest padded sequence of the whole batch.
        """
        if self.config.attn_input_format == "thd":
            hidden_states, layer_kwargs = self._packed_inputs(
                input_ids, attention_mask, cu_seqlens, max_seqlen, cu_seqlens_padded, local_cu_seqlens
            )
        else:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens given but config.attn_input_format is 'bshd'; build the model with 'thd'")
            if input_ids.dim() != 2:
                raise ValueError(f"bshd input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
            hidden_states = self.embeddings(input_ids, attention_mask=attention_mask)
            layer_kwargs = {"rotary_pos_emb": self.rotary_embeddings(input_ids.shape[1])}
            if attention_mask is None:
                layer_kwargs.update(attention_mask=None, self_attn_mask_type="no_mask")
            else:  # TE wants [B, 1, 1, S] booleans with True = masked out.
                layer_kwargs["attention_mask"] = ~attention_mask.bool()[:, None, None, :]
        return self.encoder(hidden_states, **layer_kwargs)

    def _packed_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        cu_seqlens_padded: torch.Tensor | None,
        local_cu_seqlens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The embedded packed tokens and the layers' keyword arguments, whole sequences or a CP shard of them."""
        if cu_seqlens is None or max_seqlen is None:
            raise ValueError("attn_input_format='thd' needs cu_seqlens (int32 [n+1]) and max_seqlen (a Python int)")
        if attention_mask is not None:
            raise ValueError("packed (thd) batches take cu_seqlens instead of attention_mask; pass one of them")
        if isinstance(max_seqlen, torch.Tensor):
            raise TypeError("max_seqlen must be a Python int: reading a device tensor would sync host and device")
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError(f"packed input_ids must be [1, T] or [T], got shape {tuple(input_ids.shape)}")
        if cu_seqlens.dtype != torch.int32:
            raise ValueError(f"cu_seqlens must be int32 (TE's requirement), got {cu_seqlens.dtype}")
        sharded = self.cp_size > 1
        if sharded != (cu_seqlens_padded is not None and local_cu_seqlens is not None):
            raise ValueError(
                f"with cp_size={self.cp_size}, cu_seqlens_padded and local_cu_seqlens must be given exactly when "
                "cp_size > 1 (a shard of context_parallel.shard_collated_batch)"
            )
        hidden_states = self.embeddings(input_ids.reshape(-1), cu_seqlens=cu_seqlens, local_cu_seqlens=local_cu_seqlens)
        layer_kwargs = {
            "attention_mask": None,
            "rotary_pos_emb": self.packed_rotary(cu_seqlens, hidden_states.shape[0], max_seqlen),
            "cu_seqlens_q": cu_seqlens,
            "cu_seqlens_kv": cu_seqlens,
            "max_seqlen_q": max_seqlen,
            "max_seqlen_kv": max_seqlen,
        }
        if sharded:  # pad_between_seqs: TE's RoPE takes cu_seqlens_padded only when told (it does not infer it)
            layer_kwargs.update(
                cu_seqlens_q_padded=cu_seqlens_padded, cu_seqlens_kv_padded=cu_seqlens_padded, pad_between_seqs=True
            )
        return hidden_states, layer_kwargs


class NVEsmLMHead(nn.Module):
    """ESM-2's LM head: dense -> exact (erf) GELU -> LayerNorm -> decoder tied to the embeddings, plus bias."""

    def __init__(self, config: NVEsmConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, rows = config.hidden_size, te_vocab_rows(config)
        self.dense = nn.Linear(hidden, hidden, device=device, dtype=dtype)
        self.layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps, device=device, dtype=dtype)
        self.decoder = nn.Linear(hidden, rows, bias=False, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.empty(rows, device=device, dtype=dtype))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits over the padded vocabulary."""
        features = self.layer_norm(F.gelu(self.dense(hidden_states)))
        return self.decoder(features) + self.bias


def load_te_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Strict ``load_state_dict`` that tolerates only missing TE ``_extra_state`` (FP8 metadata) entries."""
    result = model.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith(EXTRA_STATE_SUFFIX)]
    if missing or result.unexpected_keys:
        raise KeyError(
            f"state dict does not match {type(model).__name__}: missing {missing[:5]} ({len(missing)} total), "
            f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)} total)"
        )


class TEMaskedLM(nn.Module):
    """The masked-LM forward both TE families share: backbone, head over the padded vocabulary, sliced logits, loss.

    A family's class names its ``backbone()`` (embeddings and layers) and its ``padded_logits`` (the head).
    """

    config: Any

    def backbone(self) -> nn.Module:
        raise NotImplementedError

    def padded_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cu_seqlens_padded: torch.Tensor | None = None,
        local_cu_seqlens: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        """Masked-LM logits (last dim = real vocab size) and, given labels, the mean cross-entropy in float32.

        bshd: ``input_ids``/``attention_mask``/``labels`` are ``[B, S]``, mask 1 = real token.
        thd: ``input_ids``/``labels`` are ``[1, T]`` or ``[T]``; ``cu_seqlens`` (int32, on device) has one entry per
        sequence boundary and ends at T (a trailing padding segment is its own entry); ``max_seqlen`` is a Python int.
        A context-parallel shard (``set_context_parallel``) also takes ``cu_seqlens_padded`` and ``local_cu_seqlens``.
        Labels equal to -100 are ignored. Nothing here reads device values on the host.
        """
        select_norm_kernel(self.config.norm_kernel)
        hidden_states = self.backbone()(
            input_ids,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            cu_seqlens_padded=cu_seqlens_padded,
            local_cu_seqlens=local_cu_seqlens,
        )
        vocab = self.config.vocab_size
        logits = self.padded_logits(hidden_states)[..., :vocab].reshape(*input_ids.shape, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        return MaskedLMOutput(loss=loss, logits=logits)


class NVEsmForMaskedLM(TEMaskedLM):
    """ESM-2 masked LM on TransformerEngine; weights interchange with transformers' ``EsmForMaskedLM``.

    Build with ``device="meta"`` to allocate nothing, shard (e.g. FSDP2), then ``to_empty(device="cuda")`` and
    :meth:`init_weights`. Under FSDP2 keep the embeddings and ``lm_head`` in one unit, since their weight is shared.
    """

    def __init__(
        self, config: NVEsmConfig, device: torch.device | str | None = None, fp8_weights_recipe: Any = None
    ) -> None:
        super().__init__()
        _check_supported_architecture(config)
        self.config = config
        resolved = _resolve_device(device)
        dtype = PARAMS_DTYPES[config.params_dtype]
        with construction_draws_kept_apart(resolved):
            self.esm = NVEsmModel(config, resolved, dtype, fp8_weights_recipe)
            self.lm_head = NVEsmLMHead(config, resolved, dtype)
        self.tie_weights()
        if resolved.type != "meta":
            self.init_weights()

    def tie_weights(self) -> None:
        """Share the decoder weight with the word embeddings (``to_empty`` and sharding replace the Parameters)."""
        self.lm_head.decoder.weight = self.esm.embeddings.word_embeddings.weight

    def set_fp8(self, recipe: Any, fp8_group: Any = None, fp4_recipe: Any = None) -> None:
        """Run the encoder layers in FP8 with this TE recipe (None: no FP8); embeddings and LM head never use FP8.

        ``fp4_recipe`` (NVFP4) runs ``config.fp4_layers`` in FP4 instead. ``fp8_group`` is the process group over
        which TE reduces amax statistics (e.g. the data-parallel group).
        """
        self.esm.encoder.fp8_recipe = recipe
        self.esm.encoder.fp4_recipe = fp4_recipe
        self.esm.encoder.fp8_group = fp8_group

    def make_cuda_graphs(self, tokens: int, segments: int, max_seqlen: int, autocast_dtype: torch.dtype | None) -> None:
        """Graph the transformer layers for packed batches of one static shape (``NVEsmModel.make_cuda_graphs``)."""
        self.esm.make_cuda_graphs(tokens, segments, max_seqlen, autocast_dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and persistent buffer in place, as transformers initialises ESM-2.

        Works on whatever device the tensors now live on, including FSDP2 DTensor shards after
        ``to_empty(device="cuda")``, with the same values on any number of ranks (``initialization.py`` has the
        rule); rotary frequencies are recomputed, the contact head is drawn like a linear layer. Does not touch the
        FP8 metadata that TE keeps outside parameters.
        """
        self.tie_weights()
        paddings = embedding_paddings(self)
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                padding = paddings.get(id(param), NOT_AN_EMBEDDING)
                if isinstance(param, te.QuantizedTensor):  # FP8 primary weights: draw in BF16, then quantise
                    values = torch.empty(param.shape, dtype=param.dtype, device=param.device)
                    init_parameter_(module, name, values, self.config, padding)
                    param.copy_(values)
                else:
                    init_parameter_(module, name, param, self.config, padding)
        rotary = self.esm.rotary_embeddings
        head_dim = 2 * rotary.inv_freq.shape[0]
        rotary.inv_freq.copy_(rotary_inverse_frequencies(head_dim, rope_base(self.config)))
        contact_head = self.esm.contact_head
        contact_head.regression_weight.normal_(mean=0.0, std=self.config.initializer_range)
        contact_head.regression_bias.zero_()

    def load_te_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        load_te_state_dict(self, state_dict)

    @classmethod
    def from_hf_checkpoint(
        cls,
        path: str | Path,
        config: NVEsmConfig | None = None,
        device: torch.device | str | None = None,
        **te_options: Any,
    ) -> "NVEsmForMaskedLM":
        """Build the TE model from a transformers ESM-2 checkpoint directory (config.json + weights).

        ``config`` defaults to the checkpoint's own config.json; ``te_options`` are ``NVEsmConfig`` fields
        (``attn_input_format``, ``fuse_qkv_params``, ...) applied on top. The model is built on meta and materialised
        once, so weights are not initialised only to be overwritten.
        """
        base_config = config if config is not None else EsmConfig.from_pretrained(path)
        config = NVEsmConfig.from_esm_config(base_config, **te_options)
        te_state = convert_hf_to_te(load_hf_state_dict(path), config)
        model = cls(config, device="meta")
        model.to_empty(device=_resolve_device(device))
        model.tie_weights()
        model.load_te_state_dict(te_state)
        return model

    def backbone(self) -> nn.Module:
        return self.esm

    def padded_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)
