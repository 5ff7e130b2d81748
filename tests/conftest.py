"""Shared test set-up: offline, isolated caches, the recipe folder importable, Hydra configs composable."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE_DIR = Path(__file__).resolve().parents[1]
SAMPLE_FASTA = RECIPE_DIR / "data" / "sample" / "938293.PRJEB85.HG003687.faa"
sys.path.insert(0, str(RECIPE_DIR))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _isolated_hf_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep `datasets` caches out of the user's home and independent between test sessions."""
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(RECIPE_DIR / "tokenizers" / "esm2")


def compose(config_name: str = "L0_sanity", overrides: list[str] | None = None):
    """The Hydra config a command line `--config-name NAME overrides...` would produce."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(RECIPE_DIR / "hydra_config"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def tiny_esm_config(**overrides):
    """A two-layer, two-head ESM-2 config of width 16 (rotary, ESM-2's tokens), for tests that build models quickly."""
    from transformers import EsmConfig

    options = dict(vocab_size=33, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                   position_embedding_type="rotary", pad_token_id=1, mask_token_id=32, token_dropout=True,
                   max_position_embeddings=64)  # fmt: skip
    return EsmConfig(**(options | overrides))


def read_fasta_sequences(limit: int | None = None) -> list[str]:
    from dataset import read_fasta

    sequences = [record["sequence"].rstrip("*") for record in read_fasta([str(SAMPLE_FASTA)])]
    return sequences[:limit]


def free_port() -> int:
    """A TCP port nobody listens on, for a local process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args, out_dir, nproc=1, env=None, timeout=600):
    """Run a recipe script as a user would: `python ARGS...`, or `torchrun --nproc_per_node=N ARGS...` for N > 1.

    The two cores of a CI machine are split between the processes (torch threads); Hydra's run folder goes under
    `out_dir`.
    """
    launcher = [sys.executable]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*launcher, *args, f"hydra.run.dir={out_dir / 'hydra'}"],
        cwd=RECIPE_DIR,
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc)), "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(path):
    """The JSON lines a run's `logger.metrics_file` holds."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
