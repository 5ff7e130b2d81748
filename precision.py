"""Low precision: recipe names from Hydra → TransformerEngine recipes, the per-layer plan, hardware and padding rules.

Users pick an FP8 recipe by name (`fp8_config.recipe`), NVFP4 with `fp4_config`, and which layers run in which with
`fp8_layers` / `fp4_layers`; everything that follows — the precision of every layer, whether this GPU can run it,
the token multiple that packed batches must be padded to — is derived here, so nobody needs to know TE's alignment
rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from errors import RecipeError


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
FP4_RECIPES: dict[str, RecipeSpec] = {
    "NVFP4BlockScaling": RecipeSpec("NVFP4BlockScaling", (10, 0), "Blackwell (sm_100+)", 32, "E2M1"),
}
FP8_FORMATS = ("E4M3", "HYBRID")
BF16_TOKEN_MULTIPLE = 8  # keeps BF16 GEMM shapes tensor-core friendly


class PrecisionConfigError(RecipeError, ValueError):
    """The precision settings cannot run here; the message says what to change."""


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def fp8_enabled(cfg: Any) -> bool:
    return bool(cfg.fp8_config.enabled)


def fp4_enabled(cfg: Any) -> bool:
    return bool(cfg.fp4_config.enabled)


def token_multiple(cfg: Any) -> int:
    """The multiple a micro-batch's token count must be padded to for the configured precision."""
    multiple = BF16_TOKEN_MULTIPLE
    if fp8_enabled(cfg):
        multiple = math.lcm(multiple, FP8_RECIPES[cfg.fp8_config.recipe].token_multiple)
    if fp4_enabled(cfg):
        multiple = math.lcm(multiple, FP4_RECIPES[cfg.fp4_config.recipe].token_multiple)
    return multiple


def precision_problems(cfg: Any, use_te: bool) -> list[str]:
    """Everything wrong with the precision and packing settings for this configuration (empty when fine)."""
    problems = []
    if cfg.use_sequence_packing and not use_te:
        problems.append(
            "use_sequence_packing=true needs the TransformerEngine model (the reference transformers ESM-2 has no "
            "packed THD attention). Run on a GPU with TransformerEngine and use_te=auto|true, or set "
            "use_sequence_packing=false."
        )
    for section, enabled, recipes in (
        ("fp8_config", fp8_enabled, FP8_RECIPES),
        ("fp4_config", fp4_enabled, FP4_RECIPES),
    ):
        if not enabled(cfg):
            continue
        if not use_te:
            problems.append(
                f"{section}.enabled=true needs the TransformerEngine model: use_te=auto|true on a GPU host."
            )
        if cfg[section].recipe not in recipes:
            problems.append(f"{section}.recipe={cfg[section].recipe!r} is not one of {sorted(recipes)}.")
    fp8 = cfg.fp8_config
    if fp8_enabled(cfg) and fp8.format is not None and fp8.format not in FP8_FORMATS:
        problems.append(f"fp8_config.format={fp8.format!r} must be one of {FP8_FORMATS} (or null for the default).")
    return problems


def unsupported_reason(recipe_name: str, device: torch.device) -> str | None:
    """Why this GPU cannot run the recipe (its compute capability is too low), or None when it can."""
    section, recipes = ("fp4_config", FP4_RECIPES) if recipe_name in FP4_RECIPES else ("fp8_config", FP8_RECIPES)
    spec = recipes[recipe_name]
    capability = torch.cuda.get_device_capability(device)
    if capability >= spec.min_capability:
        return None
    name = torch.cuda.get_device_name(device)
    runnable = ", ".join(n for n, s in recipes.items() if capability >= s.min_capability)
    alternative = f"Choose a recipe this GPU supports ({runnable})" if runnable else "Use FP8 or BF16 on this GPU"
    return (
        f"{section}.recipe={recipe_name} needs a {spec.hardware} GPU (compute capability "
        f"{spec.min_capability[0]}.{spec.min_capability[1]} or newer), but {name} has compute capability "
        f"{capability[0]}.{capability[1]}. {alternative}."
    )


def check_gpu_supports(cfg: Any, device: torch.device) -> None:
    """Refuse, naming the GPU's compute capability, a recipe this GPU cannot run (MXFP8, NVFP4 before Blackwell)."""
    enabled = [cfg.fp8_config.recipe] * fp8_enabled(cfg) + [cfg.fp4_config.recipe] * fp4_enabled(cfg)
    reasons = [reason for name in enabled if (reason := unsupported_reason(name, device))]
    if reasons:
        raise PrecisionConfigError(" ".join(reasons))


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


def build_fp4_recipe(cfg: Any) -> Any:
    """TE's NVFP4 recipe for `cfg.fp4_config` (its rounding and Hadamard options as keys), or None when FP4 is off."""
    if not fp4_enabled(cfg):
        return None
    from transformer_engine.common import recipe as te_recipe

    fp4 = cfg.fp4_config
    kwargs = {
        "disable_stochastic_rounding": not fp4.stochastic_rounding,
        "disable_rht": not fp4.random_hadamard,
        "disable_2d_quantization": not fp4.two_d_weight_quantization,
        **(fp4.recipe_kwargs or {}),
    }
    return getattr(te_recipe, FP4_RECIPES[fp4.recipe].te_class)(**kwargs)


LAYER_PRECISIONS = ("bf16", "fp8", "fp4")
RECIPE_LABELS = {
    "DelayedScaling": "FP8 delayed scaling",
    "Float8CurrentScaling": "FP8 current scaling",
    "Float8BlockScaling": "FP8 block scaling",
    "MXFP8BlockScaling": "MXFP8",
    "NVFP4BlockScaling": "NVFP4",
}


@dataclass(frozen=True)
class PrecisionPlan:
    """The precision of every transformer layer, in order: "bf16", "fp8" (the FP8 recipe) or "fp4" (NVFP4).

    Embeddings and the LM head are never quantised. The plan is what a checkpoint was trained with: saved with it,
    and compared on resume.
    """

    layers: tuple[str, ...]
    fp8_recipe: str | None = None
    fp4_recipe: str | None = None

    def numbers(self, precision: str) -> list[int]:
        return [number for number, layer in enumerate(self.layers, start=1) if layer == precision]

    def label(self, precision: str) -> str:
        recipe = {"fp8": self.fp8_recipe, "fp4": self.fp4_recipe}.get(precision)
        return RECIPE_LABELS.get(recipe, str(recipe)) if recipe else "BF16"

    def describe(self) -> str:
        """One clause per precision, e.g. "layers 1–4, 30–33: BF16; layers 5–29: FP8 current scaling"."""
        clauses = []
        for precision in LAYER_PRECISIONS:
            if numbers := self.numbers(precision):
                noun = "layers" if len(numbers) > 1 else "layer"
                clauses.append(f"{noun} {layer_ranges(numbers)}: {self.label(precision)}")
        return "; ".join(clauses)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint's facts (JSON- and pickle-safe)."""
        return {"layers": list(self.layers), "fp8_recipe": self.fp8_recipe, "fp4_recipe": self.fp4_recipe}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PrecisionPlan:
        return cls(tuple(values["layers"]), values.get("fp8_recipe"), values.get("fp4_recipe"))


def layer_ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 4, 30, 31] → "1–4, 30–31"."""
    spans: list[list[int]] = []
    for number in sorted(numbers):
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(f"{a}–{b}" if b > a else str(a) for a, b in spans)


def parse_layers(value: Any, key: str, num_layers: int) -> tuple[list[int] | None, list[str]]:
    """A layer list as users write it: null, a number, a list of numbers and "a-b" ranges, or "1-4,30-33".

    Returns the 1-based layer numbers (None for null) and what is wrong with them.
    """
    if value is None:
        return None, []
    items = value.split(",") if isinstance(value, str) else list(value) if not isinstance(value, int) else [value]
    numbers: list[int] = []
    for item in items:
        text = str(item).strip().replace("–", "-")
        first, _, last = text.partition("-")
        if isinstance(item, bool) or not (first.isdigit() and (not last or last.isdigit())):
            return None, [f"{key}={value!r}: {item!r} is not a layer number or a range like 5-29"]
        low, high = int(first), int(last or first)
        if low > high:
            return None, [f"{key}={value!r}: the range {text} runs backwards"]
        numbers += range(low, high + 1)
    problems = []
    if outside := sorted({n for n in numbers if not 1 <= n <= num_layers}):
        problems.append(f"{key}={value!r}: layers {outside} do not exist (the model has layers 1 to {num_layers})")
    if len(set(numbers)) < len(numbers):
        problems.append(f"{key}={value!r}: lists a layer more than once")
    return numbers, problems


def plan_problems(cfg: Any, num_layers: int) -> tuple[PrecisionPlan | None, list[str]]:
    """The precision plan of `cfg` for a model of `num_layers`, or None and every reason it cannot be built.

    Rules: with one format on, its list (or every layer, when null) runs in it; with FP8 and NVFP4 both on, one list
    is needed and the other format takes the layers it leaves; layers in no list are BF16. Lists must not overlap,
    name layers the model does not have, or be given for a format that is off.
    """
    fp8_on, fp4_on = fp8_enabled(cfg), fp4_enabled(cfg)
    fp8_list, problems = parse_layers(cfg.fp8_layers, "fp8_layers", num_layers)
    fp4_list, fp4_problems = parse_layers(cfg.fp4_layers, "fp4_layers", num_layers)
    problems += fp4_problems
    for key, listed, on, how in (
        ("fp8_layers", fp8_list, fp8_on, "an FP8 precision, e.g. precision=fp8_current"),
        ("fp4_layers", fp4_list, fp4_on, "fp4_config.enabled=true (precision=nvfp4 for NVFP4 only)"),
    ):
        if listed is not None and not on:
            problems.append(f"{key} is set but that format is off: turn it on with {how}, or drop {key}")
    if fp8_on and fp4_on and fp8_list is None and fp4_list is None:
        problems.append(
            "FP8 and NVFP4 are both on: say which layers run in which with fp8_layers or fp4_layers (the other "
            "format takes the remaining layers), e.g. fp4_layers=5-28"
        )
    if fp8_list is not None and fp4_list is not None and (both := sorted(set(fp8_list) & set(fp4_list))):
        problems.append(f"fp8_layers and fp4_layers both list layers {layer_ranges(both)}: give each layer one format")
    if problems:
        return None, problems
    every = set(range(1, num_layers + 1))
    fp8 = set(fp8_list) if fp8_list is not None else (every - set(fp4_list or ())) if fp8_on else set()
    fp4 = set(fp4_list) if fp4_list is not None else (every - fp8) if fp4_on else set()
    layers = tuple("fp8" if n in fp8 else "fp4" if n in fp4 else "bf16" for n in range(1, num_layers + 1))
    recipes = (cfg.fp8_config.recipe if fp8_on else None, cfg.fp4_config.recipe if fp4_on else None)
    return PrecisionPlan(layers, *recipes), []


def resolve_plan(cfg: Any, num_layers: int) -> PrecisionPlan:
    plan, problems = plan_problems(cfg, num_layers)
    if plan is None:
        raise PrecisionConfigError("; ".join(problems))
    return plan
