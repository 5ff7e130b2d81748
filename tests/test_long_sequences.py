"""Long proteins: activation checkpointing, sequences beyond the model's positions, packing and the memory model."""

import json

import numpy as np
import pytest
import torch
from conftest import compose
from hypothesis import given, settings
from hypothesis import strategies as st

import train_fsdp2
from activation_checkpointing import resolve_checkpoint_plan
from config_validation import ConfigError, validate_config
from loader import PackedBatchSampler, pack_by_token_budget
from memory_model import activation_bytes_per_token_layer, estimate_memory, model_parameters
from model import build_model, load_model_config, model_directory

CHECKPOINTING = [
    ["activation_checkpointing.mode=full"],
    ["activation_checkpointing.mode=selective", "activation_checkpointing.selective_part=mlp"],
    ["activation_checkpointing.mode=selective", "activation_checkpointing.selective_part=attention"],
    ["activation_checkpointing.mode=full", "activation_checkpointing.layers=[2-4]"],
    ["activation_checkpointing.mode=full", "activation_checkpointing.layers=2"],
]


def reference_model(overrides, model_tag="esm2_t6_8M_UR50D", layers=None):
    cfg = compose("L0_sanity", [f"model_tag={model_tag}", *overrides])
    config = load_model_config(model_tag)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = build_model(cfg, config, use_te=False, attn_input_format="bshd", device="cpu")
    return cfg, config, model.train()


def masked_batch(batch=3, length=96):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 24, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, length // 2 :] = 0  # one padded row
    labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.15, ids, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_gradients(model, batch):
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def without_checkpointing():
    """The loss and gradients of one batch with every activation kept (reference model, FP32)."""
    return loss_and_gradients(reference_model([])[2], masked_batch())


@pytest.mark.parametrize("overrides", CHECKPOINTING, ids=lambda o: " ".join(x.split(".")[-1] for x in o))
def test_checkpointing_gives_the_loss_and_gradients_of_keeping_everything(overrides, without_checkpointing):
    expected_loss, expected = without_checkpointing
    _, _, recomputing = reference_model(overrides)
    loss, gradients = loss_and_gradients(recomputing, masked_batch())
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert gradients.keys() == expected.keys() and len(gradients) > 6 * 12
    for name, grad in gradients.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def retained_bytes(model, batch) -> int:
    """What the forward leaves allocated for the backward (CPU allocator events): activations, logits and loss."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
        output = model(**batch)
    retained = sum(event.self_cpu_memory_usage for event in profile.events())
    del output
    return retained


@pytest.mark.parametrize(
    "mode", ["none", "full", "selective_mlp", "selective_attention"], ids=lambda m: m.replace("_", " ")
)
def test_memory_model_activations_match_a_cpu_measurement(mode):
    """Per token and layer, within 10%, at a shape the coefficients were not measured at (150M's width)."""
    kind, _, part = mode.partition("_")
    overrides = [f"activation_checkpointing.mode={kind}"] + (
        [f"activation_checkpointing.selective_part={part}"] * bool(part)
    )
    batch = {k: v[:, :80] for k, v in masked_batch(batch=2, length=80).items()}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    measured = []
    for layers in (2, 3):
        cfg, config, model = reference_model(overrides, "esm2_t30_150M_UR50D", layers=layers)
        measured.append(retained_bytes(model, batch))
    per_token_layer = (measured[1] - measured[0]) / batch["input_ids"].numel()
    estimate = activation_bytes_per_token_layer(cfg, config, use_te=False, on_cpu=True)
    assert per_token_layer == pytest.approx(estimate, rel=0.10), (per_token_layer, estimate)


def test_memory_model_weights_gradients_and_optimizer_match_the_tensors():
    cfg, config, model = reference_model([])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_and_gradients(model, masked_batch())
    optimizer.step()
    trained = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in trained)
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in trained)
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    estimate = estimate_memory(cfg, config, use_te=False, strategy="ddp", world_size=1, tokens=1024, on_gpu=False)
    assert model_parameters(config) == pytest.approx(sum(p.numel() for p in trained), rel=0.01)
    assert estimate.weights == pytest.approx(weights, rel=0.10)
    assert estimate.gradients == pytest.approx(gradients, rel=0.10)
    assert estimate.optimizer == pytest.approx(states, rel=0.10)
    sharded = estimate_memory(cfg, config, use_te=False, strategy="fsdp2", world_size=4, tokens=1024, on_gpu=False)
    assert sharded.optimizer == pytest.approx(estimate.optimizer / 4) and sharded.activations == estimate.activations
    full = compose("L0_sanity", ["activation_checkpointing.mode=full"])
    recomputed = estimate_memory(full, config, use_te=False, strategy="ddp", world_size=1, tokens=1024, on_gpu=False)
    assert recomputed.activations < estimate.activations / 10  # each layer keeps only its input
    assert (
        "Estimated peak memory per rank" in recomputed.describe() and "whole layers recomputed" in recomputed.describe()
    )


def validation_error(overrides, model_tag="esm2_t6_8M_UR50D"):
    cfg = compose("L0_sanity", [f"model_tag={model_tag}", *overrides])
    with pytest.raises(ConfigError) as error:
        validate_config(cfg, load_model_config(cfg.model_tag), False, train_fsdp2.STRATEGY)
    return str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["activation_checkpointing.mode=partial"], "activation_checkpointing.mode='partial': must be one of"),
        (["activation_checkpointing.selective_part=ffn"], "activation_checkpointing.selective_part='ffn'"),
        (["activation_checkpointing.layers=[0-2]"], "layers [0] do not exist (the model has layers 1 to 6)"),
        (["activation_checkpointing.layers=9"], "a count of layers must lie in 0..6"),
        (["+activation_checkpointing.every=2"], "activation_checkpointing.every: unknown key"),
        (["activation_checkpointing.mode=full", "use_torch_compile=true"], "turn one of them off"),
        (["dataset.max_seq_length=2"], "must be an integer of at least 3"),
    ],
)
def test_bad_checkpointing_and_length_settings_are_refused_with_their_fix(overrides, message):
    assert message in validation_error(overrides)


def test_rotary_models_take_sequences_beyond_their_positions_and_absolute_ones_are_refused(tmp_path):
    cfg = compose("L0_sanity", ["dataset.max_seq_length=32768", "activation_checkpointing.mode=full"])
    validate_config(cfg, load_model_config(cfg.model_tag), False, train_fsdp2.STRATEGY)  # ESM-2: rotary
    config = json.loads((model_directory("esm2_t6_8M_UR50D") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "position_embedding_type": "absolute"}))
    message = validation_error(["dataset.max_seq_length=2048"], model_tag=str(tmp_path))
    assert "'absolute' position embeddings for 1026 positions" in message and "use at most 1026" in message


def test_a_plan_counts_layers_from_one_and_describes_itself():
    section = compose("L0_sanity", ["activation_checkpointing.mode=full", "activation_checkpointing.layers=[1-2,5]"])
    plan = resolve_checkpoint_plan(section.activation_checkpointing, 6)
    assert plan.layers == (1, 2, 5)
    assert plan.describe(6) == "activation checkpointing: whole layers recomputed in the backward pass, layers 1–2, 5"
    off = resolve_checkpoint_plan(compose("L0_sanity").activation_checkpointing, 6)
    assert not off.enabled and "off" in off.describe(6)


def test_export_records_the_trained_length(tmp_path):
    """transformers must neither truncate nor warn at the length the model was trained at."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    import convert

    _, config, model = reference_model([])
    out = convert.export_hf_model(
        model.state_dict(), config, tmp_path / "final", "tokenizers/esm2", source_format="hf", trained_length=4096
    )
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 4096
    assert config.max_position_embeddings == 1026  # the live model's config is left alone
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == 4096
    loaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    encoded = tokenizer("M" + "KLVA" * 500, return_tensors="pt")  # 2,003 tokens: beyond the original 1,026
    with torch.no_grad():
        logits = loaded(**encoded).logits
    assert logits.shape == (1, 2003, 33) and torch.isfinite(logits).all()


def lognormal_lengths(count, seed=0, low=50, high=32768):
    """Protein-like lengths: most a few hundred residues, a long tail to tens of thousands."""
    return np.clip(np.random.default_rng(seed).lognormal(6.2, 1.3, count).astype(int), low, high)


@pytest.mark.parametrize("budget", [32768, 65536])
def test_lookahead_packing_keeps_padding_below_one_percent_from_50_to_32k_tokens(budget):
    lengths = lognormal_lengths(20000)
    assert lengths.min() == 50 and lengths.max() == 32768
    unused = {}
    for lookahead in (1, 256):
        packs = list(pack_by_token_budget(enumerate(lengths.tolist()), budget, lookahead=lookahead))
        assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in pack) <= budget for pack in packs)
        unused[lookahead] = 1 - lengths.sum() / (len(packs) * budget)
    assert unused[256] < 0.01 < unused[1], unused  # in-order packing wastes several percent


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    count=st.integers(1, 400),
    budget=st.sampled_from([32768, 40000, 65536]),
    world_size=st.integers(1, 4),
    lookahead=st.sampled_from([1, 16, 256]),
)
def test_long_sequences_are_packed_once_per_epoch_within_the_budget(seed, count, budget, world_size, lookahead):
    lengths = lognormal_lengths(count, seed)
    per_rank = []
    for rank in range(world_size):
        sampler = PackedBatchSampler(lengths, budget, 32768, rank, world_size, seed=seed, lookahead=lookahead)
        per_rank.append(list(sampler))
    assert len({len(packs) for packs in per_rank}) == 1
    packs = [pack for packs in per_rank for pack in packs]
    assert sorted(i for pack in packs for i in pack) == list(range(count))
    assert all(sum(min(lengths[i], 32768) for i in pack) <= budget for pack in packs)
