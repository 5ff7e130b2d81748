"""AMPLIFY in the training recipe, on CPU: model choice, start-up refusals, init rule, masking, FLOPs, and short runs.

The e2e runs use the tiny AMPLIFY (model_configs/amplify_tiny) so that together they stay near a minute: the sanity
config's loss falls, DDP and FSDP2 on two gloo ranks give the first loss of one rank with the same global batch (see
tests/test_strategies.py for why), and the final export of a two-rank run loads with `trust_remote_code=True`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import RECIPE_DIR, compose, launch, read_metrics
from torch import nn

import train_fsdp2
import train_mfsdp
from activation_checkpointing import apply_activation_checkpointing, resolve_checkpoint_plan
from benchmark import matmul_parameters
from collator import MLMMasker
from config_validation import ConfigError, validate_config
from families import max_positions, model_family
from initialization import esm2_init_on_materialisation
from model import ModelConfigError, build_model, is_te_model, load_model_config, model_directory, transformer_layers
from modeling_amplify import AMPLIFY, AMPLIFYConfig, AMPLIFYRMSNorm, swiglu_hidden_size

AMPLIFY_TOKENIZER = RECIPE_DIR / "tokenizers" / "amplify"


def validate(cfg, use_te=False, strategy=train_fsdp2.STRATEGY):
    validate_config(cfg, load_model_config(cfg.model_tag), use_te, strategy)


def tiny_model(overrides: list[str] | None = None) -> nn.Module:
    cfg = compose("L0_sanity_amplify", overrides)
    torch.manual_seed(0)
    return build_model(cfg, load_model_config(cfg.model_tag), use_te=False, attn_input_format="bshd", device="cpu")


def test_amplify_directories_load_an_amplify_config_and_esm_stays_esm():
    for tag in ("amplify_tiny", "amplify_120M", "amplify_350M"):
        config = load_model_config(tag)
        assert isinstance(config, AMPLIFYConfig) and model_family(config) == "amplify"
        assert max_positions(config) == 2048
    esm = load_model_config("esm2_t6_8M_UR50D")
    assert model_family(esm) == "esm2" and max_positions(esm) == 1026
    with pytest.raises(ModelConfigError, match="AMPLIFY checkpoint"):
        model_directory("no_such_model")


def test_the_reference_amplify_is_built_with_its_layers():
    model = tiny_model()
    assert isinstance(model, AMPLIFY) and not is_te_model(model)
    layers = transformer_layers(model)
    assert len(layers) == 2 and layers[0] is model.transformer_encoder[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize(("mode", "part"), [("full", "mlp"), ("selective", "mlp"), ("selective", "attention")])
def test_activation_checkpointing_of_the_reference_amplify_keeps_the_gradients(mode, part):
    input_ids = torch.randint(6, 26, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()

    def gradients(overrides):
        model = tiny_model(overrides)
        model(input_ids, labels=labels).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain = gradients([])
    recomputed = gradients([f"activation_checkpointing.mode={mode}", f"activation_checkpointing.selective_part={part}"])
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_wraps_the_amplify_block_parts():
    model = tiny_model()
    cfg = compose("L0_sanity_amplify", ["activation_checkpointing.mode=selective", "activation_checkpointing.layers=1"])
    plan = resolve_checkpoint_plan(cfg.activation_checkpointing, 2)
    apply_activation_checkpointing(transformer_layers(model), plan, te_layers=False)
    first, second = model.transformer_encoder
    assert "forward" in vars(first.ffn) and "forward" not in vars(second.ffn)


def test_megatron_fsdp_materialisation_gives_amplify_its_uniform_rule():
    """The per-module materialisation Megatron-FSDP does, emulated on CPU: AMPLIFY's rule, not ESM-2's normal."""
    config = load_model_config("amplify_tiny")
    with torch.device("meta"):
        model = AMPLIFY(config)
    torch.manual_seed(0)
    with esm2_init_on_materialisation(model, torch.device("cpu")):
        for module in model.modules():
            if next(module.parameters(recurse=False), None) is not None:
                module.to_empty(device="cpu", recurse=False)
                module.reset_parameters()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            bound = config.decoder_init_range
            assert module.weight.abs().max() <= bound, name
            assert module.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), (
                name
            )  # uniform, not N(0, b)
        elif isinstance(module, AMPLIFYRMSNorm):
            assert torch.all(module.weight == 1), name
    assert torch.all(model.decoder.bias == 0)
    embedding = model.encoder.weight
    assert embedding.abs().max() <= config.embedding_init_range
    assert torch.all(embedding[config.pad_token_id] == 0) and embedding[5].abs().sum() > 0


def test_masking_with_the_amplify_tokenizer_uses_its_amino_acids_and_spares_specials():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(AMPLIFY_TOKENIZER)
    masker = MLMMasker.from_tokenizer(tokenizer, max_seq_length=512, mlm_probability=0.5, seed=3)
    assert sorted(masker.special_token_ids) == [0, 1, 2, 3, 4]  # <pad> <unk> <mask> <bos> <eos>
    assert sorted(masker.random_token_ids) == list(range(6, 26))  # the 20 canonical residues, not '|' or 'B'
    tokens = tokenizer("MKVLAXGHWC" * 20)["input_ids"]
    assert tokens[0] == 3 and tokens[-1] == 4 and 1 in tokens  # <bos> ... <eos>, X is <unk>
    masked, labels = masker(tokens)
    special = torch.isin(torch.tensor(tokens), torch.tensor([0, 1, 2, 3, 4])).numpy()
    assert (labels[special] == -100).all() and (masked[special] == torch.tensor(tokens).numpy()[special]).all()
    changed = (masked != tokens) & (masked != 2)
    assert changed.any() and set(masked[changed].tolist()) <= set(range(6, 26))


def test_matmul_parameters_are_the_reference_amplifys_linear_weights():
    config = load_model_config("amplify_tiny")
    linear = sum(m.weight.numel() for m in AMPLIFY(config).modules() if isinstance(m, nn.Linear))
    assert matmul_parameters(config) == linear
    hidden, ffn = 640, swiglu_hidden_size(2560)
    assert matmul_parameters(load_model_config("amplify_120M")) == 24 * (4 * hidden**2 + 3 * hidden * ffn) + hidden * 27


def test_the_amplify_configs_pass_the_start_up_gate():
    validate(compose("L0_sanity_amplify"))
    for name in ("L1_amplify_120M", "L1_amplify_350M"):
        cfg = compose(name, ["dataset.path=data/sample/938293.PRJEB85.HG003687.faa"])
        validate(cfg)
        assert cfg.lr_scheduler.kind == "cosine" and list(cfg.optimizer.betas) == [0.9, 0.95]
        assert cfg.dataset.max_seq_length == 512 and cfg.lr_scheduler.warmup_steps == 1000


@pytest.mark.parametrize(
    ("config_name", "overrides", "use_te", "strategy", "message"),
    [
        (
            "L0_sanity_amplify",
            ["tokenizer=tokenizers/esm2"],
            False,
            train_fsdp2.STRATEGY,
            "use tokenizer=tokenizers/amplify",
        ),
        ("L0_sanity", ["tokenizer=tokenizers/amplify"], False, train_fsdp2.STRATEGY, "use tokenizer=tokenizers/esm2"),
        (
            "L0_sanity_amplify",
            ["dataset.max_seq_length=4096"],
            False,
            train_fsdp2.STRATEGY,
            "dataset.max_seq_length=4096: above this AMPLIFY model's max_length (2048)",
        ),
        ("L0_sanity_amplify", ["fp32_residual_connection=true"], True, train_fsdp2.STRATEGY, "ESM-2 only"),
        (
            "L1_amplify_120M",
            ["dataset.path=x.faa", "lr_scheduler.kind=step"],
            False,
            train_mfsdp.STRATEGY,
            "lr_scheduler.kind='step': must be one of ('linear', 'cosine')",
        ),
    ],
)
def test_amplify_refusals_say_what_to_do(config_name, overrides, use_te, strategy, message):
    with pytest.raises(ConfigError) as error:
        validate(compose(config_name, overrides), use_te=use_te, strategy=strategy)
    assert message in str(error.value)


def test_an_amplify_variant_the_models_do_not_implement_is_refused_at_start_up(tmp_path):
    config = json.loads((RECIPE_DIR / "model_configs" / "amplify_tiny" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "rms_norm": False}))
    with pytest.raises(ConfigError, match="LayerNorm instead of RMSNorm"):
        validate(compose("L0_sanity_amplify", [f"model_tag={tmp_path}"]))


def test_the_tokenizer_refusal_names_the_mismatch():
    with pytest.raises(ConfigError) as error:
        validate(compose("L0_sanity_amplify", ["tokenizer=tokenizers/esm2"]))
    assert "vocabulary size 33 (the model's: 27)" in str(error.value)
    validate(compose("L0_sanity", ["dataset.max_seq_length=4096"]))  # rotary ESM-2 may still exceed its positions


# --- end to end: short CPU runs of the tiny AMPLIFY ---

SMALL = [
    "--config-name",
    "L0_sanity_amplify",
    "num_train_steps=3",
    "dataset.max_seq_length=64",
    "validation.every_n_steps=3",
    "logger.log_every_n_steps=1",
    "logger.progress_bar=false",
]
GLOBAL_BATCH = 8


@pytest.mark.e2e
def test_sanity_amplify_loss_is_finite_and_falls(tmp_path):
    metrics_file = tmp_path / "metrics.jsonl"
    args = [
        "train_ddp.py",
        "--config-name",
        "L0_sanity_amplify",
        "num_train_steps=40",
        "dataset.max_seq_length=128",
        "validation.every_n_steps=0",
        "logger.progress_bar=false",
        f"logger.metrics_file={metrics_file}",
    ]
    result = launch(args, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [m["train/loss"] for m in read_metrics(metrics_file) if "train/loss" in m]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert losses[0] < math.log(27) + 0.1 and losses[-1] < losses[0] - 0.2, losses


@pytest.fixture(scope="module")
def amplify_run(tmp_path_factory):
    """`(entrypoint, nproc) -> (metrics, out_dir)`: one run each of the same global batch of 8 (micro-batch
    8 // nproc); the 2-rank FSDP2 run exports its final model."""

    @functools.cache
    def run_of(entrypoint, nproc):
        out_dir = tmp_path_factory.mktemp(f"amplify_{entrypoint.removesuffix('.py')}_{nproc}")
        export = nproc == 2 and entrypoint == "train_fsdp2.py"
        args = [
            entrypoint,
            *SMALL,
            f"dataset.micro_batch_size={GLOBAL_BATCH // nproc}",
            f"logger.metrics_file={out_dir / 'metrics.jsonl'}",
            f"checkpoint.ckpt_dir={out_dir / 'ckpt'}" if export else "checkpoint.ckpt_dir=null",
        ]
        result = launch(args, out_dir, nproc=nproc, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return read_metrics(out_dir / "metrics.jsonl"), out_dir

    return run_of


@pytest.mark.e2e
@pytest.mark.parametrize("entrypoint", ["train_ddp.py", "train_fsdp2.py"])
def test_amplify_two_ranks_complete_with_the_first_loss_of_one_rank(amplify_run, entrypoint):
    """The one-rank reference is DDP's for both: the first loss is computed before any strategy updates a weight."""
    two = amplify_run(entrypoint, 2)[0]
    train = [m for m in two if "train/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3] and all(math.isfinite(m["train/loss"]) for m in train)
    assert math.isfinite(next(m["val/loss"] for m in two if "val/loss" in m))
    first_one, first_two = amplify_run("train_ddp.py", 1)[0][0]["train/loss"], train[0]["train/loss"]
    assert abs(first_two - first_one) / first_one < 1e-4, (first_one, first_two)


EXPORT_CHECK = """
import json, sys
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer
model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer(["MKVLAGHWC", "MKV"], padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**ids).logits
torch.save({"logits": logits, "ids": ids["input_ids"], "module": type(model).__module__}, sys.argv[2])
"""


@pytest.mark.e2e
def test_the_final_amplify_export_loads_with_remote_code(amplify_run, tmp_path):
    export_dir = amplify_run("train_fsdp2.py", 2)[1] / "ckpt" / "final_model"
    card = (export_dir / "README.md").read_text()
    assert card.startswith("# AMPLIFY masked language model (amplify_tiny") and "trust_remote_code=True" in card
    assert json.loads((export_dir / "config.json").read_text())["max_length"] == 2048
    env = {"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-I", "-c", EXPORT_CHECK, str(export_dir), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = torch.load(tmp_path / "out.pt")
    assert output["module"].startswith("transformers_modules.")
    from convert_amplify import load_amplify_checkpoint

    with torch.no_grad():
        expected = load_amplify_checkpoint(export_dir).eval()(output["ids"], attention_mask=output["ids"] != 0).logits
    mask = output["ids"] != 0
    torch.testing.assert_close(output["logits"][mask], expected[mask])
