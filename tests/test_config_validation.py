"""The start-up gate: every unusable value named with its fix, all at once, before any data or model is built."""

import pytest
import torch
from conftest import compose

import train_ddp
import train_fsdp2
import train_mfsdp
from config_validation import ConfigError, validate_config
from model import load_model_config


def validate(cfg, use_te=False, strategy=train_fsdp2.STRATEGY):
    validate_config(cfg, load_model_config(cfg.model_tag), use_te, strategy)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_train_steps=0", "num_train_steps=0: must be a positive integer"),
        ("dataset.micro_batch_size=-2", "dataset.micro_batch_size=-2: must be a positive integer"),
        ("grad_acc_steps=0", "grad_acc_steps=0"),
        ("dataset.max_seq_length=2", "dataset.max_seq_length=2: must be an integer of at least 3"),
        ("optimizer.lr=0", "optimizer.lr=0: must be positive"),
        ("use_te=maybe", "use_te='maybe'"),
        ("fp32_residual_connection=yes", "fp32_residual_connection='yes': must be true or false"),
        ("rope_kernel=cuda", "rope_kernel='cuda': must be one of ('triton', 'te')"),
        ("gelu_in_gemm=sometimes", "gelu_in_gemm='sometimes': must be true or false"),
        ("norm_kernel=apex", "norm_kernel='apex': must be one of ('te', 'cudnn')"),
    ],
)
def test_bad_values_are_reported_clearly(override, message):
    cfg = compose("L0_sanity", [override])
    with pytest.raises(ConfigError, match="Invalid configuration") as error:
        validate(cfg)
    assert message in str(error.value)


def test_all_problems_are_listed_at_once():
    cfg = compose("L0_sanity", ["num_train_steps=-1", "dataset.micro_batch_size=0"])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert "num_train_steps" in str(error.value) and "micro_batch_size" in str(error.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("checkpoint.max_checkpoints=0", "checkpoint.max_checkpoints=0: must be a positive integer, or null"),
        ("checkpoint.async_save=1", "checkpoint.async_save=1: must be true or false"),
        ("checkpoint.save_every_n_steps=-5", "checkpoint.save_every_n_steps=-5: must be a non-negative integer"),
        ("fsdp.reshard_after_forward=sometimes", "fsdp.reshard_after_forward='sometimes': must be true or false"),
        ("dataset.num_workers=-1", "dataset.num_workers=-1: must be a non-negative integer"),
        ("dataset.streaming=yes", "dataset.streaming='yes': must be true or false"),
        ("+dataset.micro_batchsize=4", "dataset.micro_batchsize: unknown key. Did you mean dataset.micro_batch_size?"),
        ("+checkpoint.every=5", "checkpoint.every: unknown key."),
        ("+use_sequence_pack=true", "use_sequence_pack: unknown key. Did you mean use_sequence_packing?"),
        ("+fp8_config.recpe=DelayedScaling", "fp8_config.recpe: unknown key. Did you mean fp8_config.recipe?"),
        ("+zzz=1", "zzz: unknown key. Every key is documented in hydra_config/defaults.yaml."),
        ("fp8_layers=[0,3]", "fp8_layers=[0, 3]: layers [0] do not exist (the model has layers 1 to 6)"),
        ("fp8_layers=[2,2]", "fp8_layers=[2, 2]: lists a layer more than once"),
        ("fp4_layers=5-9", "fp4_layers='5-9': layers [7, 8, 9] do not exist (the model has layers 1 to 6)"),
        ("+fp4_config.stochastic=false", "fp4_config.stochastic: unknown key. Did you mean fp4_config.stochastic_"),
        ("fp4_config.random_hadamard=maybe", "fp4_config.random_hadamard='maybe': must be true or false"),
    ],
)
def test_every_section_is_checked(override, message):
    with pytest.raises(ConfigError) as error:
        validate(compose("L0_sanity", [override]))
    assert message in str(error.value)


def test_l1_configs_require_the_data_path():
    cfg = compose("L1_650M")
    with pytest.raises(ConfigError, match=r"needs dataset\.path \(`\?\?\?` in the config\).*dataset\.path=\.\.\."):
        validate(cfg)
    validate(compose("L1_650M", ["dataset.path=data/sample/938293.PRJEB85.HG003687.faa"]))  # then it passes


def test_megatron_fsdp_refuses_torch_compile_and_bad_options():
    cfg = compose("L0_sanity", ["use_torch_compile=true", "mfsdp.zero_dp_strategy=zero3", "+mfsdp.overlap=true"])
    with pytest.raises(ConfigError) as error:
        validate(cfg, strategy=train_mfsdp.STRATEGY)
    message = str(error.value)
    assert "use_torch_compile=true is not supported by train_mfsdp.py" in message
    assert "mfsdp.zero_dp_strategy='zero3': must be one of" in message
    assert "mfsdp.overlap: unknown key" in message
    assert "train_mfsdp.py needs CUDA GPUs; use train_fsdp2.py or train_ddp.py on CPU." in message  # no GPU here
    validate(compose("L0_sanity", ["use_torch_compile=true"]), strategy=train_ddp.STRATEGY)  # DDP compiles


def test_settings_a_strategy_ignores_are_named_once(caplog):
    from config_validation import log_inert_keys

    with caplog.at_level("WARNING"):
        log_inert_keys(compose("L0_sanity"), train_ddp.STRATEGY)  # defaults: nothing to say
        assert not caplog.records
        log_inert_keys(
            compose("L0_sanity", ["use_meta_device=false", "mfsdp.zero_dp_strategy=optim"]), train_ddp.STRATEGY
        )
    (record,) = caplog.records
    assert record.getMessage() == "These settings have no effect with train_ddp.py: use_meta_device, mfsdp.*."


def test_a_budget_smaller_than_a_sequence_is_refused():
    cfg = compose("L0_sanity", ["use_sequence_packing=true", "token_micro_batch_size=100"])
    with pytest.raises(ConfigError, match="token_micro_batch_size=100: must be a token count of at least"):
        validate(cfg, use_te=True)


def test_unknown_recipe_and_reference_model_packing_are_refused():
    cfg = compose(
        "L0_sanity", ["fp8_config.enabled=true", "fp8_config.recipe=Float4Magic", "use_sequence_packing=true"]
    )
    with pytest.raises(ConfigError) as error:
        validate(cfg, use_te=False)
    message = str(error.value)
    assert "use_sequence_packing=true needs the TransformerEngine model" in message and "use_te" in message
    assert "fp8_config.recipe='Float4Magic' is not one of" in message


@pytest.mark.parametrize(
    ("overrides", "strategy", "messages"),
    [
        (["static_shapes=true"], train_ddp.STRATEGY, ["static_shapes=true needs use_sequence_packing=true"]),
        (["max_sequences_per_pack=0"], train_ddp.STRATEGY, ["max_sequences_per_pack=0: must be a positive integer"]),
        (
            ["cuda_graphs=true", "use_sequence_packing=true", "use_torch_compile=true"],
            train_fsdp2.STRATEGY,
            [
                "cuda_graphs=true is not supported by train_fsdp2.py",
                "use train_ddp.py",
                "cuda_graphs=true and use_torch_compile=true exclude each other",
            ],
        ),
        (["cuda_graphs=true"], train_ddp.STRATEGY, ["cuda_graphs=true needs use_sequence_packing=true"]),
        (["master_weights=gpu"], train_ddp.STRATEGY, ["master_weights='gpu': must be one of ('model', 'optimizer')"]),
        (
            ["master_weights=optimizer", "use_fp32_master_weights=false"],
            train_ddp.STRATEGY,
            ["use_fp32_master_weights=false asks for none"],
        ),
        (["master_weights=optimizer"], train_fsdp2.STRATEGY, ["not supported by train_fsdp2.py"]),
        (["master_weights=optimizer"], train_mfsdp.STRATEGY, ["not supported by train_mfsdp.py"]),
        (
            ["fp8_config.quantized_model_init=true"],
            train_ddp.STRATEGY,
            ["needs FP8 on", "add master_weights=optimizer"],
        ),
        (
            [
                "precision=fp8_delayed",
                "fp8_config.quantized_model_init=true",
                "master_weights=optimizer",
                "cuda_graphs=true",
                "use_sequence_packing=true",
                "pretrained=true",
            ],
            train_ddp.STRATEGY,
            ["quantized_model_init=true and cuda_graphs=true exclude each other", "cannot load pretrained weights"],
        ),
        (["fp8_config.quantized_model_init=maybe"], train_ddp.STRATEGY, ["must be true or false"]),
    ],
)
def test_static_shapes_graphs_and_master_weights_are_refused_where_they_cannot_work(overrides, strategy, messages):
    with pytest.raises(ConfigError) as error:
        validate(compose("L0_sanity", overrides), use_te=True, strategy=strategy)
    for message in messages:
        assert message in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without a GPU")
def test_cuda_graphs_need_a_gpu():
    cfg = compose("L0_sanity", ["cuda_graphs=true", "use_sequence_packing=true"])
    with pytest.raises(ConfigError, match="cuda_graphs=true needs the TransformerEngine model on a GPU"):
        validate(cfg, use_te=False, strategy=train_ddp.STRATEGY)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without a GPU")
def test_master_weights_in_the_optimizer_need_a_gpu():
    with pytest.raises(ConfigError, match="master_weights=optimizer needs TransformerEngine's FusedAdam on a GPU"):
        validate(compose("L0_sanity", ["master_weights=optimizer"]), use_te=False, strategy=train_ddp.STRATEGY)


def test_megatron_fsdp_refuses_cuda_graphs():
    cfg = compose("L0_sanity", ["cuda_graphs=true", "use_sequence_packing=true"])
    with pytest.raises(ConfigError, match=r"cuda_graphs=true is not supported by train_mfsdp\.py"):
        validate(cfg, use_te=True, strategy=train_mfsdp.STRATEGY)


CP_PACKED = ["cp_size=2", "use_sequence_packing=true"]


@pytest.mark.parametrize(
    ("overrides", "use_te", "strategy", "world", "message"),
    [
        (CP_PACKED, True, train_fsdp2.STRATEGY, "3", "cp_size=2 does not divide this job's 3 rank(s) (WORLD_SIZE)"),
        (CP_PACKED, True, train_ddp.STRATEGY, "1", "cp_size=2 does not divide this job's 1 rank(s)"),
        (["cp_size=2"], True, train_ddp.STRATEGY, "2", "padded BSHD batches cannot be split: set use_sequence_packing"),
        (CP_PACKED, False, train_fsdp2.STRATEGY, "2", "cp_size=2 needs the TransformerEngine model"),
        (CP_PACKED, True, train_mfsdp.STRATEGY, "2", "cp_size=2 is not supported by train_mfsdp.py"),
        ([*CP_PACKED, "cuda_graphs=true"], True, train_ddp.STRATEGY, "2", "cuda_graphs=true and cp_size=2 exclude"),
        ([*CP_PACKED, "static_shapes=true"], True, train_ddp.STRATEGY, "2", "static_shapes=true and cp_size=2 exclude"),
        ([*CP_PACKED, "use_torch_compile=true"], True, train_ddp.STRATEGY, "2", "use_torch_compile=true and cp_size=2"),
        (["cp_size=3", "use_sequence_packing=true", "cp_comm_type=a2a"], True, train_ddp.STRATEGY, "3", "20 heads"),
        (["cp_size=0"], True, train_ddp.STRATEGY, "1", "cp_size=0: must be a positive integer (1: no context"),
        (["cp_comm_type=ring"], True, train_ddp.STRATEGY, "1", "cp_comm_type='ring': must be one of ('p2p',"),
    ],
)
def test_context_parallel_settings_that_cannot_work_are_refused(
    monkeypatch, overrides, use_te, strategy, world, message
):
    """Checked from torchrun's WORLD_SIZE before the process group, the data or the model exist."""
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ConfigError) as error:
        validate(compose("L0_sanity", overrides), use_te=use_te, strategy=strategy)
    assert message in str(error.value)


def test_context_parallel_passes_where_it_can_work(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")  # a 4 x 2 grid; a2a: 20 heads over 2 ranks
    for strategy in (train_ddp.STRATEGY, train_fsdp2.STRATEGY):
        validate(compose("L0_sanity", [*CP_PACKED, "cp_comm_type=a2a"]), use_te=True, strategy=strategy)
    monkeypatch.setenv("WORLD_SIZE", "2")
    validate(compose("L0_sanity_cp"), use_te=True, strategy=train_fsdp2.STRATEGY)  # the shipped 2-GPU sanity run


def test_a_cpu_run_with_context_parallelism_stops_before_the_process_group_data_or_model(monkeypatch):
    """`python train_fsdp2.py cp_size=2` on CPU: setup_run's first step names every reason, in one message."""
    import training

    def must_not_run(*args, **kwargs):
        raise AssertionError("reached past the start-up check")

    monkeypatch.setattr(training, "configure_process_logs", lambda rank: None)
    for name in ("take_checkpoint_dir", "init_distributed", "build_dataloaders"):
        monkeypatch.setattr(training, name, must_not_run)
    with pytest.raises(ConfigError) as error:
        training.setup_run(compose("L0_sanity", ["cp_size=2"]), train_fsdp2.STRATEGY)
    for reason in ("cp_size=2 does not divide this job's 1 rank(s)", "set use_sequence_packing=true",
                   "cp_size=2 needs the TransformerEngine model"):  # fmt: skip
        assert reason in str(error.value)
