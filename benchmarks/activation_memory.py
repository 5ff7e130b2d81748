"""Measure what a TE ESM-2 layer keeps for the backward pass, per token, with each activation-checkpointing mode.

    python benchmarks/activation_memory.py --model esm2_t33_650M_UR50D --tokens 8192 --layers 4 > memory.jsonl

Builds the recipe's TE model (model.build_model, so checkpointing is applied exactly as in training) with a few
layers of the given model's shape and runs packed training steps of `tokens` tokens. After a warm-up step (TE's FP8
weight copies and workspaces exist from then on) it reads the CUDA allocator after each layer's forward: the growth
from layer 2 to the last layer, divided by layers and tokens, is the activation memory per token per layer. The
step's peak above what was allocated before it is printed too, beside memory_model.py's estimate of both. One JSON
line per (precision, weights, mode).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

RECIPE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RECIPE))

from memory_model import activation_bytes_per_token_layer  # noqa: E402
from model import build_model, load_model_config  # noqa: E402

MODES = [("none", "mlp"), ("full", "mlp"), ("selective", "mlp"), ("selective", "attention")]
SETTINGS = [  # (precision preset, use_fp32_master_weights)
    ("bf16", True),
    ("bf16", False),
    ("fp8_delayed", True),
    ("fp8_current", True),
]


def measure(args: argparse.Namespace, precision: str, fp32: bool, mode: str, part: str) -> dict:
    overrides = [
        f"model_tag={args.model}",
        "use_te=true",
        "use_sequence_packing=true",
        f"precision={precision}",
        f"use_fp32_master_weights={str(fp32).lower()}",
        f"activation_checkpointing.mode={mode}",
        f"activation_checkpointing.selective_part={part}",
    ]
    with initialize_config_dir(config_dir=str(RECIPE / "hydra_config"), version_base="1.3"):
        cfg = compose("L0_sanity", overrides)
    config = load_model_config(args.model)
    config.num_hidden_layers = args.layers
    model = build_model(cfg, config, use_te=True, attn_input_format="thd", device="cuda")
    tokens, seq = args.tokens, min(args.tokens, args.seq)
    input_ids = torch.randint(4, 24, (tokens,), device="cuda")
    labels = torch.where(torch.rand(tokens, device="cuda") < 0.15, input_ids, -100)
    cu_seqlens = torch.arange(0, tokens + 1, seq, device="cuda", dtype=torch.int32)
    after_layer: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda *_: after_layer.append(torch.cuda.memory_allocated()))
        for layer in model.esm.encoder.layers
    ]

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=labels, cu_seqlens=cu_seqlens, max_seqlen=seq).loss
        loss.backward()
        model.zero_grad(set_to_none=False)  # gradients stay allocated, as between training steps

    step()
    torch.cuda.synchronize()
    after_layer.clear()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for hook in hooks:
        hook.remove()
    per_layer = (after_layer[-1] - after_layer[0]) / (args.layers - 1) / tokens
    estimate = activation_bytes_per_token_layer(cfg, config, use_te=True)
    return {
        "model": args.model,
        "precision": precision,
        "weights": "fp32" if fp32 else "bf16",
        "mode": mode if mode != "selective" else f"selective_{part}",
        "tokens": tokens,
        "seq": seq,
        "layers": args.layers,
        "hidden": config.hidden_size,
        "bytes_per_token_layer": round(per_layer, 1),
        "per_hidden": round(per_layer / config.hidden_size, 2),
        "estimate_bytes_per_token_layer": estimate,
        "step_peak_above_start_gib": round(peak / 2**30, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t33_650M_UR50D")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=8192, help="sequence length within the pack")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    for precision, fp32 in SETTINGS:
        for mode, part in MODES:
            print(json.dumps(measure(args, precision, fp32, mode, part)), flush=True)
            torch.cuda.empty_cache()  # the measured model is gone: its memory goes back before the next one


if __name__ == "__main__":
    main()
