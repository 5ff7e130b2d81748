"""CPU tests of the AMPLIFY reference model, tokenizer, reference <-> TE conversion and the self-contained export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import convert_amplify
from modeling_amplify import (
    AMPLIFY,
    AMPLIFYConfig,
    amplify_state_dict_shapes,
    apply_rotary,
    rotary_frequencies,
    swiglu_hidden_size,
)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "tokenizers" / "amplify"
PUBLIC_120M = dict(hidden_size=640, num_attention_heads=10, intermediate_size=2560)


def tiny_config(**overrides: object) -> AMPLIFYConfig:
    values = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    values.update(overrides)
    return AMPLIFYConfig(**values)


def random_public_state(config: AMPLIFYConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the public layout, norms around 1 so that mapping mistakes show."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in amplify_state_dict_shapes(config).items():
        values = torch.randn(shape, generator=generator)
        state[key] = 1.0 + 0.1 * values if key.endswith("norm.weight") or "norm_2" in key else 0.05 * values
    return state


def with_te_options(config: AMPLIFYConfig, fuse_qkv: bool = True, padded_vocab_size: int = 32) -> AMPLIFYConfig:
    """The TE options the conversion reads, on a plain config (NVAmplifyConfig needs TransformerEngine)."""
    config.fuse_qkv_params, config.padded_vocab_size = fuse_qkv, padded_vocab_size
    return config


def batch(config: AMPLIFYConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, config.vocab_size, (3, 12), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 3, 4
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, 8:], attention_mask[1, 8:] = 0, 0
    return input_ids, attention_mask


def write_public_checkpoint(directory: Path, config: AMPLIFYConfig, state: dict[str, torch.Tensor]) -> Path:
    """A checkpoint folder as chandar-lab publishes it: remote-code config.json keys and model.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    values = {key: getattr(config, key) for key in convert_amplify.PUBLIC_CONFIG_KEYS}
    values.update(
        _name_="AMPLIFY",
        architectures=["AMPLIFY"],
        auto_map={"AutoConfig": "amplify.AMPLIFYConfig", "AutoModel": "amplify.AMPLIFY"},
        model_type="AMPLIFY",
        pre_activation_layer_norm=True,
        torch_dtype="float32",
        transformers_version="4.46.3",
        vocab_path="conf/tokenizer/amplify_vocab.txt",
    )
    (directory / "config.json").write_text(json.dumps(values, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    return directory


def reference_with(state: dict[str, torch.Tensor], config: AMPLIFYConfig) -> AMPLIFY:
    model = AMPLIFY(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def functional_amplify(state: dict[str, torch.Tensor], config: AMPLIFYConfig, ids, mask) -> torch.Tensor:
    """AMPLIFY's forward written independently from the public weights (additive mask, complex rotary, w12 split)."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim, seq = hidden // heads, ids.shape[1]

    def rms(x, weight):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps)) * weight

    def rotate(x, freqs):
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs.view(1, seq, 1, -1)).flatten(3)

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    freqs = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq), inv_freq).float())
    additive = torch.where(mask.bool(), 0.0, float("-inf"))[:, None, None, :].repeat(1, heads, seq, 1)
    x = F.embedding(ids, state["encoder.weight"])
    for i in range(config.num_hidden_layers):
        p = f"transformer_encoder.{i}."
        h = rms(x, state[p + "attention_norm.weight"])
        q, k, v = (F.linear(h, state[f"{p}{n}.weight"]).view(*ids.shape, heads, head_dim) for n in "qkv")
        q, k = rotate(q, freqs), rotate(k, freqs)
        scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / head_dim**0.5 + additive
        attended = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(*ids.shape, hidden)
        x = x + F.linear(attended, state[p + "wo.weight"])
        w1, w2 = state[p + "ffn.w12.weight"].chunk(2, dim=0)
        h = rms(x, state[p + "ffn_norm.weight"])
        x = x + F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w2), state[p + "ffn.w3.weight"])
    return F.linear(rms(x, state["layer_norm_2.weight"]), state["decoder.weight"], state["decoder.bias"])


def test_swiglu_sizes_and_shipped_configs() -> None:
    assert swiglu_hidden_size(2560) == 1712 and swiglu_hidden_size(3840) == 2560
    for tag, layers, hidden, heads in (("amplify_120M", 24, 640, 10), ("amplify_350M", 32, 960, 15)):
        raw = json.loads((REPO / "model_configs" / tag / "config.json").read_text())
        assert set(convert_amplify.PUBLIC_CONFIG_KEYS) <= set(raw) and raw["model_type"] == "AMPLIFY"
        config = AMPLIFYConfig.from_pretrained(REPO / "model_configs" / tag)
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (layers, hidden, heads)
        assert (config.max_length, config.vocab_size, config.norm_eps) == (2048, 27, 1e-5)


def test_tokenizer_ids() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tokenizer("MKVLA|XB")["input_ids"] == [3, 22, 17, 9, 6, 7, 5, 1, 26, 4]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.mask_token_id) == (0, 1, 2)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (3, 4, 27)
    assert sorted(tokenizer.all_special_ids) == [0, 1, 2, 3, 4]
    assert tokenizer.convert_ids_to_tokens(list(range(6, 27))) == list("LAGVSERTIDPKQNFYMHWCB")


def test_rotary_rotates_adjacent_pairs() -> None:
    x = torch.randn(1, 5, 2, 8)
    rotated = apply_rotary(x, rotary_frequencies(8, 5))
    position, pair = 3, 2  # dims (4, 5) rotate by position * 10000^(-4/8)
    angle = torch.tensor(position * 10000.0 ** (-2 * pair / 8))
    a, b = x[0, position, :, 2 * pair], x[0, position, :, 2 * pair + 1]
    expected = torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], dim=-1)
    torch.testing.assert_close(rotated[0, position, :, 2 * pair : 2 * pair + 2], expected)


@pytest.mark.parametrize("fuse_qkv", [True, False], ids=["fused_qkv", "separate_qkv"])
def test_conversion_round_trips_are_bit_exact(fuse_qkv: bool) -> None:
    config = with_te_options(AMPLIFYConfig(num_hidden_layers=2, **PUBLIC_120M), fuse_qkv)
    public = random_public_state(config)
    te_state = convert_amplify.convert_amplify_to_te(public, config)
    shapes = {key: tuple(value.shape) for key, value in te_state.items()}
    assert shapes == convert_amplify.te_amplify_state_dict_shapes(config)
    assert te_state[convert_amplify.TE_EMBEDDING_KEY].shape[0] == 32
    back = convert_amplify.convert_te_to_amplify(te_state, config)
    assert list(back) == list(public) and all(torch.equal(back[key], public[key]) for key in public)

    generator = torch.Generator().manual_seed(1)
    te_random = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    for key in (convert_amplify.TE_EMBEDDING_KEY, convert_amplify.TE_DECODER_KEY, convert_amplify.TE_DECODER_BIAS_KEY):
        te_random[key][config.vocab_size :] = 0.0  # padded rows are zero in the model and never get a gradient
    te_random[convert_amplify.TE_INV_FREQ_KEY] = te_state[convert_amplify.TE_INV_FREQ_KEY]
    te_random["amplify.encoder.layers.0.layernorm_mlp._extra_state"] = torch.zeros(3)  # FP8 metadata is ignored
    again = convert_amplify.convert_amplify_to_te(convert_amplify.convert_te_to_amplify(te_random, config), config)
    assert set(again) == set(shapes) and all(torch.equal(again[key], te_random[key]) for key in again)


def test_fused_qkv_is_te_per_head_interleaved_and_w12_is_fc1() -> None:
    config = with_te_options(tiny_config())
    public = random_public_state(config)
    te_state = convert_amplify.convert_amplify_to_te(public, config)
    fused = te_state["amplify.encoder.layers.1.self_attention.layernorm_qkv.weight"]
    head_dim = config.hidden_size // config.num_attention_heads
    for head in range(config.num_attention_heads):
        block = fused[3 * head * head_dim : 3 * (head + 1) * head_dim]
        for part, name in enumerate("qkv"):
            rows = public[f"transformer_encoder.1.{name}.weight"][head * head_dim : (head + 1) * head_dim]
            assert torch.equal(block[part * head_dim : (part + 1) * head_dim], rows)
    fc1 = te_state["amplify.encoder.layers.1.layernorm_mlp.fc1_weight"]
    assert torch.equal(fc1, public["transformer_encoder.1.ffn.w12.weight"])  # TE's swiglu gates the first half too


# TE name -> public name of the per-layer tensors copied unchanged, written out independently of convert_amplify.py.
TE_FROM_PUBLIC_LAYER = {
    "self_attention.layernorm_qkv.layer_norm_weight": "attention_norm.weight",  # the RMSNorm before attention
    "self_attention.proj.weight": "wo.weight",
    "layernorm_mlp.layer_norm_weight": "ffn_norm.weight",  # the RMSNorm before the SwiGLU
    "layernorm_mlp.fc1_weight": "ffn.w12.weight",
    "layernorm_mlp.fc2_weight": "ffn.w3.weight",
}


def distinct_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A tensor of every shape whose values occur nowhere else (tensor i: 100000 (i + 1) + 0, 1, 2, ...)."""
    assert max(math.prod(shape) for shape in shapes.values()) < 100_000 and len(shapes) < 100  # exact in FP32
    return {
        key: (torch.arange(math.prod(shape), dtype=torch.float32) + 100_000 * (index + 1)).reshape(shape)
        for index, (key, shape) in enumerate(shapes.items())
    }


def per_head(tensor: torch.Tensor, head: int, head_dim: int) -> torch.Tensor:
    return tensor[head * head_dim : (head + 1) * head_dim]


@pytest.mark.parametrize("fuse_qkv", [True, False], ids=["fused_qkv", "separate_qkv"])
def test_every_tensor_converts_to_its_own_name_both_ways(fuse_qkv: bool) -> None:
    """The two RMSNorms, the attention output and the MLP projections of tiny_config all have one shape: swapping any
    of them in both directions would round-trip exactly, so each name is checked against the tensor it must hold."""
    config = with_te_options(tiny_config(), fuse_qkv)
    heads, head_dim, vocab, rows = 4, 16, config.vocab_size, 32
    public = distinct_tensors(amplify_state_dict_shapes(config))

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tensor.new_zeros(rows - vocab, *tensor.shape[1:])])

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    expected = {
        "amplify.embeddings.word_embeddings.weight": padded(public["encoder.weight"]),
        "amplify.rotary_embeddings.inv_freq": inv_freq,
        "decoder.layer_norm_weight": public["layer_norm_2.weight"],  # the final RMSNorm
        "decoder.weight": padded(public["decoder.weight"]),
        "decoder.bias": padded(public["decoder.bias"]),
    }
    for i in range(config.num_hidden_layers):
        te, src = f"amplify.encoder.layers.{i}.", f"transformer_encoder.{i}."
        expected |= {te + te_suffix: public[src + suffix] for te_suffix, suffix in TE_FROM_PUBLIC_LAYER.items()}
        qkv = [public[f"{src}{name}.weight"] for name in "qkv"]
        if fuse_qkv:
            fused = [per_head(tensor, h, head_dim) for h in range(heads) for tensor in qkv]
            expected[f"{te}self_attention.layernorm_qkv.weight"] = torch.cat(fused)
        else:
            for name, tensor in zip(("query", "key", "value"), qkv, strict=True):
                expected[f"{te}self_attention.layernorm_qkv.{name}_weight"] = tensor

    te_state = convert_amplify.convert_amplify_to_te(public, config)
    assert te_state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(te_state[name], tensor), name

    te_distinct = distinct_tensors(convert_amplify.te_amplify_state_dict_shapes(config))
    back = convert_amplify.convert_te_to_amplify(te_distinct, config)
    expected_public = {
        "encoder.weight": te_distinct["amplify.embeddings.word_embeddings.weight"][:vocab],
        "layer_norm_2.weight": te_distinct["decoder.layer_norm_weight"],
        "decoder.weight": te_distinct["decoder.weight"][:vocab],
        "decoder.bias": te_distinct["decoder.bias"][:vocab],
    }
    for i in range(config.num_hidden_layers):
        te, dst = f"amplify.encoder.layers.{i}.", f"transformer_encoder.{i}."
        expected_public |= {
            dst + suffix: te_distinct[te + te_suffix] for te_suffix, suffix in TE_FROM_PUBLIC_LAYER.items()
        }
        for part, (short, name) in enumerate(zip("qkv", ("query", "key", "value"), strict=True)):
            if fuse_qkv:
                fused = te_distinct[f"{te}self_attention.layernorm_qkv.weight"]
                tensor = torch.cat([per_head(fused, 3 * h + part, head_dim) for h in range(heads)])
            else:
                tensor = te_distinct[f"{te}self_attention.layernorm_qkv.{name}_weight"]
            expected_public[f"{dst}{short}.weight"] = tensor
    assert back.keys() == expected_public.keys()
    for name, tensor in expected_public.items():
        assert torch.equal(back[name], tensor), name


def test_synthetic_public_checkpoint_loads_with_the_reference_logits(tmp_path: Path) -> None:
    config = tiny_config()
    generator = torch.Generator().manual_seed(3)
    state = random_public_state(config)
    ffn = swiglu_hidden_size(config.intermediate_size)
    for index in range(config.num_hidden_layers):  # xformers' packed SwiGLU: w12 = [w1 (gated); w2]
        w1, w2 = (0.05 * torch.randn(ffn, config.hidden_size, generator=generator) for _ in range(2))
        state[f"transformer_encoder.{index}.ffn.w12.weight"] = torch.cat([w1, w2])
    directory = write_public_checkpoint(tmp_path / "AMPLIFY_tiny", config, state)

    loaded = convert_amplify.load_amplify_checkpoint(directory).eval()
    assert loaded.config.max_length == 2048 and loaded.config.vocab_path == "conf/tokenizer/amplify_vocab.txt"
    via_transformers = AMPLIFY.from_pretrained(directory).eval()
    input_ids, attention_mask = batch(config)
    with torch.no_grad():
        expected = reference_with(state, config)(input_ids, attention_mask=attention_mask).logits
        assert torch.equal(loaded(input_ids, attention_mask=attention_mask).logits, expected)
        assert torch.equal(via_transformers(input_ids, attention_mask=attention_mask).logits, expected)
        independent = functional_amplify(state, config, input_ids, attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(expected[real], independent[real], rtol=1e-5, atol=1e-5)


def test_masks_padding_and_loss() -> None:
    config = tiny_config()
    model = reference_with(random_public_state(config), config)
    input_ids, attention_mask = batch(config)
    additive = torch.where(attention_mask.bool(), 0.0, float("-inf"))
    labels = torch.where(torch.rand(input_ids.shape) < 0.3, input_ids, torch.full_like(input_ids, -100))
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
        alone = model(input_ids[1:2, :8]).logits
        assert torch.equal(model(input_ids, attention_mask=additive).logits, out.logits)
    torch.testing.assert_close(out.logits[1:2, :8], alone, rtol=1e-5, atol=1e-5)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    expected_loss = F.cross_entropy(out.logits.reshape(-1, 27), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected_loss)
    with pytest.raises(ValueError, match="additive mask"):
        model(input_ids, attention_mask=attention_mask.float())


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    config = tiny_config()
    state = random_public_state(config)
    state["transformer_encoder.1.ffn.w12.weight"] = state["transformer_encoder.1.ffn.w12.weight"][:64]
    directory = write_public_checkpoint(tmp_path / "bad", config, state)
    message = r"'transformer_encoder\.1\.ffn\.w12\.weight' has shape \(64, 64\), expected \(128, 64\)"
    with pytest.raises(ValueError, match=message):
        convert_amplify.load_amplify_checkpoint(directory)
    wider = tiny_config(hidden_size=128)
    write_public_checkpoint(tmp_path / "wide", wider, random_public_state(config))
    with pytest.raises(ValueError, match=r"'encoder\.weight' has shape \(27, 64\), expected \(27, 128\)"):
        convert_amplify.load_amplify_checkpoint(tmp_path / "wide")
    deeper = tiny_config(num_hidden_layers=3)
    with pytest.raises(KeyError, match=r"missing 8 tensor\(s\), first \['transformer_encoder\.2\.q\.weight'"):
        convert_amplify.convert_amplify_to_te(random_public_state(config), with_te_options(deeper))
    with pytest.raises(ValueError, match="hidden_act='SwiGLU'"):
        AMPLIFY(tiny_config(hidden_act="GELU"))


EXPORT_CHECK = r"""
import importlib.util, sys, torch
for name in ("convert", "convert_amplify", "modeling_amplify", "modeling_esm_te", "model"):
    assert importlib.util.find_spec(name) is None, f"the recipe is importable: {name}"
from transformers import AutoModelForMaskedLM, AutoTokenizer
export_dir, inputs, out = sys.argv[1:]
model = AutoModelForMaskedLM.from_pretrained(export_dir, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(export_dir)
batch = torch.load(inputs)
with torch.no_grad():
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
torch.save({"logits": logits, "ids": tokenizer("MKV|X")["input_ids"], "module": type(model).__module__}, out)
"""


def test_export_loads_with_remote_code_without_the_recipe(tmp_path: Path) -> None:
    config = with_te_options(tiny_config())
    state = random_public_state(config)
    te_state = convert_amplify.convert_amplify_to_te(state, config)
    export_dir = convert_amplify.export_amplify_model(te_state, config, tmp_path / "export", TOKENIZER_DIR)
    saved = json.loads((export_dir / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForMaskedLM"] == "modeling_amplify.AMPLIFY" and saved["max_length"] == 2048
    assert set(convert_amplify.PUBLIC_CONFIG_KEYS) <= set(saved)
    assert convert_amplify.load_hf_state_dict(export_dir).keys() == amplify_state_dict_shapes(config).keys()

    input_ids, attention_mask = batch(config)
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "inputs.pt")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            EXPORT_CHECK,
            str(export_dir),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "o.pt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = torch.load(tmp_path / "o.pt")
    assert output["module"].startswith("transformers_modules.")
    assert output["ids"] == [3, 22, 17, 9, 5, 1, 4]
    with torch.no_grad():
        expected = reference_with(state, config)(input_ids, attention_mask=attention_mask).logits
    assert torch.equal(output["logits"], expected)

    with pytest.raises(FileExistsError, match="not an earlier AMPLIFY export"):
        (tmp_path / "occupied").mkdir()
        (tmp_path / "occupied" / "notes.txt").write_text("keep")
        convert_amplify.export_amplify_model(state, config, tmp_path / "occupied", TOKENIZER_DIR, "amplify")
    again = convert_amplify.export_amplify_model(state, config, export_dir, TOKENIZER_DIR, source_format="amplify")
    assert convert_amplify.load_amplify_checkpoint(again).state_dict().keys() == state.keys()
