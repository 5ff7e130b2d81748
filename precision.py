"""FP8 / MXFP8 precision: recipe names from Hydra → TransformerEngine recipes, hardware checks, padding rules.

Users pick a recipe by name (`fp8_config.recipe`); everything that follows from it — whether this GPU can run it,
and the token multiple that packed batches must be padded to — is derived here, so nobody needs to know TE's
alignment rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RecipeSpec:
    """What a TE FP8 recipe needs from the hardware and from the batch layout."""

    te_class: str
    min_capability: tuple[int, int]
    hardware: str
    token_multiple: int  # total tokens of a micro-batch must be a multiple of this
    default_format: str


FP8_RECIPES: dict[str, RecipeSpec] = {
    "DelayedScaling": RecipeSpec("DelayedScaling", (8, 9), "Ada or Hopper (sm_89+)", 16, "HYBRID"),
    "Float8CurrentScaling": RecipeSpec("Float8CurrentScaling", (8, 9), "Ada or Hopper (sm_89+)", 16, "HYBRID"),
    "Float8BlockScaling": RecipeSpec("Float8BlockScaling", (9, 0), "Hopper (sm_90+)", 128, "E4M3"),
    "MXFP8BlockScaling": RecipeSpec("MXFP8BlockScaling", (10, 0), "Blackwell (sm_100+)", 32, "E4M3"),
}
FP8_FORMATS = ("E4M3", "HYBRID")
BF16_TOKEN_MULTIPLE = 8  # keeps BF16 GEMM shapes tensor-core friendly


class PrecisionConfigError(ValueError):
    """The precision settings cannot run here; the message says what to change."""


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def fp8_enabled(cfg: Any) -> bool:
    return bool(cfg.fp8_config.enabled)


def token_multiple(cfg: Any) -> int:
    """The multiple a micro-batch's token count must be padded to for the configured precision."""
    if not fp8_enabled(cfg):
        return BF16_TOKEN_MULTIPLE
    return math.lcm(BF16_TOKEN_MULTIPLE, FP8_RECIPES[cfg.fp8_config.recipe].token_multiple)


def precision_problems(cfg: Any, use_te: bool) -> list[str]:
    """Everything wrong with the precision and packing settings for this configuration (empty when fine)."""
    problems = []
    if cfg.use_sequence_packing and not use_te:
        problems.append(
            "use_sequence_packing=true needs the TransformerEngine model (the reference transformers ESM-2 has no "
            "packed THD attention). Run on a GPU with TransformerEngine and use_te=auto|true, or set "
            "use_sequence_packing=false."
        )
    if not fp8_enabled(cfg):
        return problems
    fp8 = cfg.fp8_config
    if not use_te:
        problems.append("fp8_config.enabled=true needs the TransformerEngine model: use_te=auto|true on a GPU host.")
    if fp8.recipe not in FP8_RECIPES:
        problems.append(f"fp8_config.recipe={fp8.recipe!r} is not one of {sorted(FP8_RECIPES)}.")
    if fp8.format is not None and fp8.format not in FP8_FORMATS:
        problems.append(f"fp8_config.format={fp8.format!r} must be one of {FP8_FORMATS} (or null for the default).")
    return problems


def unsupported_reason(recipe_name: str, device: torch.device) -> str | None:
    """Why this GPU cannot run the recipe (its compute capability is too low), or None when it can."""
    spec = FP8_RECIPES[recipe_name]
    capability = torch.cuda.get_device_capability(device)
    if capability >= spec.min_capability:
        return None
    name = torch.cuda.get_device_name(device)
    return (
        f"fp8_config.recipe={recipe_name} needs a {spec.hardware} GPU (compute capability "
        f"{spec.min_capability[0]}.{spec.min_capability[1]} or newer), but {name} has compute capability "
        f"{capability[0]}.{capability[1]}. Choose a recipe this GPU supports "
        f"({', '.join(n for n, s in FP8_RECIPES.items() if capability >= s.min_capability) or 'none: use BF16'})."
    )


def check_gpu_supports(recipe_name: str, device: torch.device) -> None:
    """Refuse, naming the GPU's compute capability, a recipe this GPU cannot run (e.g. MXFP8 before Blackwell)."""
    if reason := unsupported_reason(recipe_name, device):
        raise PrecisionConfigError(reason)


def build_fp8_recipe(cfg: Any) -> Any:
    """The TransformerEngine recipe object for `cfg.fp8_config`, or None when FP8 is off."""
    if not fp8_enabled(cfg):
        return None
    from transformer_engine.common import recipe as te_recipe

    fp8 = cfg.fp8_config
    spec = FP8_RECIPES[fp8.recipe]
    kwargs = dict(fp8.recipe_kwargs or {})
    kwargs["fp8_format"] = getattr(te_recipe.Format, fp8.format or spec.default_format)
    return getattr(te_recipe, spec.te_class)(**kwargs)
