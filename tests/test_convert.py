"""CPU tests of convert.py: exact HF <-> TE round trips, the fused-QKV layout, the final export, and clear errors."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_fasta_sequences, tiny_esm_config
from safetensors.torch import save_file
from transformers import AutoModelForMaskedLM, AutoTokenizer, EsmConfig, EsmForMaskedLM

import convert

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = REPO / "model_configs"
TOKENIZER_DIR = REPO / "tokenizers" / "esm2"
FASTA = REPO / "data" / "sample" / "938293.PRJEB85.HG003687.faa"


def load_config(name: str) -> EsmConfig:
    return EsmConfig.from_pretrained(MODEL_CONFIGS / name)


def random_hf_model(name: str, seed: int = 0) -> EsmForMaskedLM:
    """ESM-2 with every parameter and the contact head random, so zero or one constants cannot hide mapping bugs."""
    torch.manual_seed(seed)
    model = EsmForMaskedLM(load_config(name)).eval()
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if "LayerNorm.weight" in name_ or "layer_norm.weight" in name_:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.02)
    return model


@pytest.fixture(scope="module")
def model_8m() -> EsmForMaskedLM:
    return random_hf_model("esm2_t6_8M_UR50D")


@pytest.fixture(scope="module")
def te_state_8m(model_8m: EsmForMaskedLM) -> dict[str, torch.Tensor]:
    return convert.convert_hf_to_te(model_8m.state_dict(), model_8m.config)


def assert_state_dicts_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize(
    ("name", "fuse_qkv"),
    [("esm2_t6_8M_UR50D", True), ("esm2_t12_35M_UR50D", True), ("esm2_t6_8M_UR50D", False)],
)
def test_round_trip_is_bit_exact(name: str, fuse_qkv: bool) -> None:
    model = random_hf_model(name, seed=1)
    config = model.config
    config.fuse_qkv_params = fuse_qkv
    hf_state = model.state_dict()
    assert all(tensor.any() for key, tensor in hf_state.items() if key.endswith("bias"))  # no all-zero biases

    te_state = convert.convert_hf_to_te(hf_state, config)

    expected_te = convert.te_state_dict_shapes(config)
    assert {key: tuple(tensor.shape) for key, tensor in te_state.items()} == expected_te
    vocab = config.vocab_size
    assert te_state[convert.EMBEDDING_KEY].shape[0] == 64
    assert not te_state[convert.EMBEDDING_KEY][vocab:].any()
    assert not te_state[convert.LM_BIAS_KEY][vocab:].any()
    assert te_state[convert.DECODER_KEY] is te_state[convert.EMBEDDING_KEY]
    assert_state_dicts_identical(convert.convert_te_to_hf(te_state, config), hf_state)


def test_fused_qkv_rows_follow_te_interleaving() -> None:
    """Independent check of TE's qkv_weight_interleaved=True layout on a tiny config.

    TE views the fused projection output as [..., heads, 3, head_dim] and splits q, k, v along the '3' axis
    (transformer_engine/pytorch/attention/multi_head_attention.py), so rows h*3d .. h*3d+3d hold q, k, v of head h.
    """
    heads, head_dim, hidden = 2, 3, 6
    query, key, value = (
        torch.arange(hidden * hidden, dtype=torch.float32).reshape(hidden, hidden) + offset for offset in (0, 100, 200)
    )
    fused = convert.fuse_qkv(query, key, value, heads)

    for head in range(heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        block = fused[head * 3 * head_dim : (head + 1) * 3 * head_dim]
        assert torch.equal(block[:head_dim], query[rows])
        assert torch.equal(block[head_dim : 2 * head_dim], key[rows])
        assert torch.equal(block[2 * head_dim :], value[rows])

    tokens = torch.randn(5, hidden)
    mixed = (tokens @ fused.T).view(5, heads, 3, head_dim)
    for index, weight in enumerate((query, key, value)):
        torch.testing.assert_close(mixed[:, :, index], (tokens @ weight.T).view(5, heads, head_dim))
    assert all(torch.equal(a, b) for a, b in zip(convert.split_qkv(fused, heads), (query, key, value), strict=True))


def test_legacy_hf_layout_is_accepted(model_8m: EsmForMaskedLM, te_state_8m: dict[str, torch.Tensor]) -> None:
    """Older checkpoints: per-layer rotary inv_freq, persisted position_ids, tied decoder left out."""
    legacy = dict(model_8m.state_dict())
    inv_freq = legacy.pop(convert.INV_FREQ_KEY)
    for index in range(model_8m.config.num_hidden_layers):
        legacy[f"esm.encoder.layer.{index}.attention.self.rotary_embeddings.inv_freq"] = inv_freq.clone()
    legacy["esm.embeddings.position_ids"] = torch.arange(1026)[None]
    del legacy[convert.DECODER_KEY]
    assert_state_dicts_identical(convert.convert_hf_to_te(legacy, model_8m.config), te_state_8m)


def test_save_pretrained_checkpoint_converts_exactly(
    model_8m: EsmForMaskedLM, te_state_8m: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """transformers 5 writes LayerNorm gamma/beta and a pattern key for inv_freq; both must be understood."""
    model_8m.save_pretrained(tmp_path)
    on_disk = convert.load_hf_state_dict(tmp_path)
    assert any(key.endswith("LayerNorm.gamma") for key in on_disk) or convert.INV_FREQ_KEY not in on_disk
    assert_state_dicts_identical(convert.convert_hf_to_te(on_disk, model_8m.config), te_state_8m)


def test_te_extra_state_and_missing_inv_freq_are_tolerated(
    model_8m: EsmForMaskedLM, te_state_8m: dict[str, torch.Tensor]
) -> None:
    te_state = dict(te_state_8m)
    te_state["esm.encoder.layers.0.self_attention.layernorm_qkv._extra_state"] = torch.zeros(3)
    del te_state[convert.INV_FREQ_KEY]
    assert_state_dicts_identical(convert.convert_te_to_hf(te_state, model_8m.config), model_8m.state_dict())


def test_export_loads_with_plain_transformers_and_reproduces_logits(
    model_8m: EsmForMaskedLM, te_state_8m: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    export_dir = convert.export_hf_model(te_state_8m, model_8m.config, tmp_path / "final", TOKENIZER_DIR)

    exported, loading_info = AutoModelForMaskedLM.from_pretrained(export_dir, output_loading_info=True)
    assert type(exported) is EsmForMaskedLM
    assert not any(loading_info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert json.loads((export_dir / "config.json").read_text())["model_type"] == "esm"
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    reference_tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    sequences = read_fasta_sequences(6)
    batch = tokenizer(sequences, padding=True, truncation=True, max_length=200, return_tensors="pt")
    reference_batch = reference_tokenizer(sequences, padding=True, truncation=True, max_length=200, return_tensors="pt")
    assert torch.equal(batch["input_ids"], reference_batch["input_ids"])
    assert batch["attention_mask"].sum(-1).min() < batch["attention_mask"].shape[1]  # padding is exercised

    with torch.no_grad():
        expected = model_8m(**reference_batch).logits
        actual = exported.eval()(**batch).logits
    assert torch.equal(actual, expected)

    assert_state_dicts_identical(
        convert.convert_hf_to_te(convert.load_hf_state_dict(export_dir), exported.config), te_state_8m
    )


def test_export_replaces_only_previous_exports(
    model_8m: EsmForMaskedLM, te_state_8m: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    hf_state = model_8m.state_dict()
    target = tmp_path / "final"
    convert.export_hf_model(hf_state, model_8m.config, target, TOKENIZER_DIR, source_format="hf")
    convert.export_hf_model(te_state_8m, model_8m.config, target, TOKENIZER_DIR)  # earlier export: replaced
    assert json.loads((target / convert.EXPORT_MANIFEST).read_text())["source_format"] == "te"
    assert [path.name for path in tmp_path.iterdir()] == ["final"]  # no staging or retired directories left

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="not an earlier model export; pass overwrite=True"):
        convert.export_hf_model(te_state_8m, model_8m.config, foreign, TOKENIZER_DIR)
    assert (foreign / "keep.txt").exists()
    convert.export_hf_model(te_state_8m, model_8m.config, foreign, TOKENIZER_DIR, overwrite=True)
    assert not (foreign / "keep.txt").exists()

    with pytest.raises(ValueError, match="source_format must be 'te' or 'hf'"):
        convert.export_hf_model(te_state_8m, model_8m.config, tmp_path / "x", TOKENIZER_DIR, source_format="megatron")


def test_failed_export_leaves_no_partial_directory(
    model_8m: EsmForMaskedLM, te_state_8m: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    with pytest.raises(OSError):
        convert.export_hf_model(te_state_8m, model_8m.config, tmp_path / "final", tmp_path / "no_tokenizer_here")
    assert list(tmp_path.iterdir()) == []


def test_missing_weights_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        convert.load_hf_state_dict(tmp_path)


def test_sharded_safetensors_are_loaded(model_8m: EsmForMaskedLM, tmp_path: Path) -> None:
    state = {key: tensor.clone() for key, tensor in model_8m.state_dict().items() if key != convert.DECODER_KEY}
    keys = list(state)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for file_name, shard_keys in shards.items():
        save_file({key: state[key] for key in shard_keys}, tmp_path / file_name)
    weight_map = {key: file_name for file_name, shard_keys in shards.items() for key in shard_keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = convert.load_hf_state_dict(tmp_path)
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[key], state[key]) for key in state)


# ---------------------------------------------------------------------------------------------------------------------
# Malformed inputs
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_hf_key_is_named(model_8m: EsmForMaskedLM) -> None:
    state = dict(model_8m.state_dict())
    del state["esm.encoder.layer.3.attention.self.key.bias"]
    with pytest.raises(KeyError, match=r"missing 1 key\(s\).*esm\.encoder\.layer\.3\.attention\.self\.key\.bias"):
        convert.convert_hf_to_te(state, model_8m.config)


def test_unexpected_key_is_named(model_8m: EsmForMaskedLM, te_state_8m: dict[str, torch.Tensor]) -> None:
    wrapped = {f"module.{key}": tensor for key, tensor in model_8m.state_dict().items()}
    with pytest.raises(KeyError, match="missing"):
        convert.convert_hf_to_te(wrapped, model_8m.config)
    state = dict(te_state_8m)
    state["lm_head.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected key\(s\).*lm_head\.extra\.weight.*strip wrapper prefixes"):
        convert.convert_te_to_hf(state, model_8m.config)


def test_wrong_shape_reports_key_and_both_shapes(
    model_8m: EsmForMaskedLM, te_state_8m: dict[str, torch.Tensor]
) -> None:
    state = dict(model_8m.state_dict())
    state["esm.encoder.layer.2.intermediate.dense.weight"] = torch.zeros(1000, 320)
    with pytest.raises(
        ValueError, match=r"layer\.2\.intermediate\.dense\.weight has shape \(1000, 320\), expected \(1280, 320\)"
    ):
        convert.convert_hf_to_te(state, model_8m.config)
    te_state = dict(te_state_8m)
    te_state["esm.encoder.layers.0.self_attention.layernorm_qkv.weight"] = torch.zeros(320, 320)
    with pytest.raises(ValueError, match=r"layernorm_qkv\.weight has shape \(320, 320\), expected \(960, 320\)"):
        convert.convert_te_to_hf(te_state, model_8m.config)


def test_config_mismatch_is_explained(model_8m: EsmForMaskedLM, te_state_8m: dict[str, torch.Tensor]) -> None:
    hf_state = model_8m.state_dict()
    with pytest.raises(ValueError, match=r"has 6 transformer layers but config\.num_hidden_layers is 12"):
        convert.convert_hf_to_te(hf_state, load_config("esm2_t12_35M_UR50D"))
    with pytest.raises(ValueError, match=r"has 6 transformer layers but config\.num_hidden_layers is 12"):
        convert.convert_te_to_hf(te_state_8m, load_config("esm2_t12_35M_UR50D"))

    wider = copy.deepcopy(model_8m.config)
    wider.hidden_size = 480
    with pytest.raises(ValueError, match=r"has width 320 but config\.hidden_size is 480"):
        convert.convert_hf_to_te(hf_state, wider)

    more_heads = copy.deepcopy(model_8m.config)
    more_heads.num_attention_heads = 40
    with pytest.raises(ValueError, match=r"contact_head\.regression_weight has 120 inputs .* implies 240"):
        convert.convert_te_to_hf(te_state_8m, more_heads)

    unpadded = copy.deepcopy(model_8m.config)
    unpadded.padded_vocab_size = None
    with pytest.raises(ValueError, match=r"has 64 rows but the config implies 33 \(config.padded_vocab_size\)"):
        convert.convert_te_to_hf(te_state_8m, unpadded)

    too_small = copy.deepcopy(model_8m.config)
    too_small.padded_vocab_size = 32
    with pytest.raises(ValueError, match=r"padded_vocab_size \(32\) is smaller than vocab_size \(33\)"):
        convert.convert_hf_to_te(hf_state, too_small)


def test_untied_decoder_is_rejected(model_8m: EsmForMaskedLM) -> None:
    state = dict(model_8m.state_dict())
    state[convert.DECODER_KEY] = state[convert.DECODER_KEY] + 1.0
    with pytest.raises(ValueError, match="ties the LM decoder to the word embeddings"):
        convert.convert_hf_to_te(state, model_8m.config)
    untied = copy.deepcopy(model_8m.config)
    untied.tie_word_embeddings = False
    with pytest.raises(ValueError, match="tie_word_embeddings is False"):
        convert.convert_hf_to_te(model_8m.state_dict(), untied)


def test_unpadded_te_layout_round_trips(model_8m: EsmForMaskedLM) -> None:
    config = copy.deepcopy(model_8m.config)
    config.padded_vocab_size = None
    te_state = convert.convert_hf_to_te(model_8m.state_dict(), config)
    assert te_state[convert.EMBEDDING_KEY].shape[0] == 33
    assert_state_dicts_identical(convert.convert_te_to_hf(te_state, config), model_8m.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# Every tensor under its own name (round trips cannot see a mapping and its inverse both wrong the same way)
# ---------------------------------------------------------------------------------------------------------------------

# TE name -> transformers name of the tensors copied unchanged, written out here independently of convert.py's tables.
TE_FROM_HF = {
    "esm.rotary_embeddings.inv_freq": "esm.rotary_embeddings.inv_freq",
    "esm.encoder.emb_layer_norm_after.weight": "esm.encoder.emb_layer_norm_after.weight",
    "esm.encoder.emb_layer_norm_after.bias": "esm.encoder.emb_layer_norm_after.bias",
    "esm.contact_head.regression_weight": "esm.contact_head.regression.weight",
    "esm.contact_head.regression_bias": "esm.contact_head.regression.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
}
TE_FROM_HF_LAYER = {  # esm.encoder.layers.{i}.KEY <- esm.encoder.layer.{i}.VALUE
    "self_attention.layernorm_qkv.layer_norm_weight": "attention.LayerNorm.weight",  # the LayerNorm before attention
    "self_attention.layernorm_qkv.layer_norm_bias": "attention.LayerNorm.bias",
    "self_attention.proj.weight": "attention.output.dense.weight",
    "self_attention.proj.bias": "attention.output.dense.bias",
    "layernorm_mlp.layer_norm_weight": "LayerNorm.weight",  # the LayerNorm before the MLP
    "layernorm_mlp.layer_norm_bias": "LayerNorm.bias",
    "layernorm_mlp.fc1_weight": "intermediate.dense.weight",
    "layernorm_mlp.fc1_bias": "intermediate.dense.bias",
    "layernorm_mlp.fc2_weight": "output.dense.weight",
    "layernorm_mlp.fc2_bias": "output.dense.bias",
}
VOCAB, PADDED_VOCAB, HEADS, HEAD_DIM = 33, 64, 2, 4


def tiny_width_8_config(fused: bool) -> EsmConfig:
    """Two layers, two heads; the MLP as wide as the model, so every projection has the same shape as any other."""
    config = tiny_esm_config(hidden_size=HEADS * HEAD_DIM, intermediate_size=HEADS * HEAD_DIM)
    config.fuse_qkv_params = fused
    return config


def distinct_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A tensor of every shape whose values occur nowhere else: tensor i holds 1000 (i + 1) + 0, 1, 2, ..."""
    return {
        key: (torch.arange(math.prod(shape), dtype=torch.float32) + 1000 * (index + 1)).reshape(shape)
        for index, (key, shape) in enumerate(shapes.items())
    }


def interleave_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """TE's fused QKV rows: head 0's q, k, v rows, then head 1's, ..."""
    rows = [tensor[h * HEAD_DIM : (h + 1) * HEAD_DIM] for h in range(HEADS) for tensor in (query, key, value)]
    return torch.cat(rows)


def padded(tensor: torch.Tensor) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_zeros(PADDED_VOCAB - VOCAB, *tensor.shape[1:])])


@pytest.mark.parametrize("fused", [True, False], ids=["fused_qkv", "separate_qkv"])
def test_hf_to_te_puts_every_tensor_under_its_te_name(fused: bool) -> None:
    config = tiny_width_8_config(fused)
    hf = distinct_tensors(convert.hf_state_dict_shapes(config))
    hf[convert.DECODER_KEY] = hf[convert.EMBEDDING_KEY]  # ESM-2 ties them
    expected = {te: hf[name] for te, name in TE_FROM_HF.items()}
    expected[convert.EMBEDDING_KEY] = expected[convert.DECODER_KEY] = padded(hf[convert.EMBEDDING_KEY])
    expected[convert.LM_BIAS_KEY] = padded(hf[convert.LM_BIAS_KEY])
    for i in range(2):
        te, src = f"esm.encoder.layers.{i}.", f"esm.encoder.layer.{i}."
        expected |= {te + te_suffix: hf[src + hf_suffix] for te_suffix, hf_suffix in TE_FROM_HF_LAYER.items()}
        for kind in ("weight", "bias"):
            query, key, value = (hf[f"{src}attention.self.{name}.{kind}"] for name in ("query", "key", "value"))
            if fused:
                expected[f"{te}self_attention.layernorm_qkv.{kind}"] = interleave_heads(query, key, value)
            else:
                for name, tensor in (("query", query), ("key", key), ("value", value)):
                    expected[f"{te}self_attention.layernorm_qkv.{name}_{kind}"] = tensor

    converted = convert.convert_hf_to_te(hf, config)

    assert converted.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(converted[name], tensor), name


@pytest.mark.parametrize("fused", [True, False], ids=["fused_qkv", "separate_qkv"])
def test_te_to_hf_puts_every_tensor_under_its_hf_name(fused: bool) -> None:
    config = tiny_width_8_config(fused)
    te = distinct_tensors(convert.te_state_dict_shapes(config))
    te[convert.DECODER_KEY] = te[convert.EMBEDDING_KEY]
    expected = {name: te[te_name] for te_name, name in TE_FROM_HF.items()}
    expected[convert.EMBEDDING_KEY] = expected[convert.DECODER_KEY] = te[convert.EMBEDDING_KEY][:VOCAB]
    expected[convert.LM_BIAS_KEY] = te[convert.LM_BIAS_KEY][:VOCAB]
    for i in range(2):
        src, hf = f"esm.encoder.layers.{i}.", f"esm.encoder.layer.{i}."
        expected |= {hf + hf_suffix: te[src + te_suffix] for te_suffix, hf_suffix in TE_FROM_HF_LAYER.items()}
        for kind in ("weight", "bias"):
            for part, name in enumerate(("query", "key", "value")):
                if fused:
                    fused_rows = te[f"{src}self_attention.layernorm_qkv.{kind}"]
                    starts = [(3 * h + part) * HEAD_DIM for h in range(HEADS)]
                    tensor = torch.cat([fused_rows[start : start + HEAD_DIM] for start in starts])
                else:
                    tensor = te[f"{src}self_attention.layernorm_qkv.{name}_{kind}"]
                expected[f"{hf}attention.self.{name}.{kind}"] = tensor

    converted = convert.convert_te_to_hf(te, config)

    assert converted.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(converted[name], tensor), name
