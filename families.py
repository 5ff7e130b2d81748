"""The model families the recipe trains, told apart by config.json's `model_type`: ESM-2 and AMPLIFY.

A leaf module (no recipe imports) so that model building, initialisation, validation and export can all ask
`model_family(config)` without importing one another.
"""

from __future__ import annotations

from typing import Any

ESM_MODEL_TYPES = ("esm", "nv_esm")
AMPLIFY_MODEL_TYPES = ("AMPLIFY", "nv_amplify")
FAMILY_TOKENIZERS = {"esm2": "tokenizers/esm2", "amplify": "tokenizers/amplify"}  # the shipped tokenizer of each


def model_family(config: Any) -> str:
    """The family, "amplify" (reference or TE AMPLIFY config) or "esm2": what every family-specific choice reads."""
    return "amplify" if getattr(config, "model_type", None) in AMPLIFY_MODEL_TYPES else "esm2"


def max_positions(config: Any) -> int:
    """The length the model's positions were trained for: ESM-2 max_position_embeddings, AMPLIFY max_length."""
    return int(config.max_length if model_family(config) == "amplify" else config.max_position_embeddings)
