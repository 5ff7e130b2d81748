"""What both shipped tokenizers are: one token per residue, a start and an end token around each sequence.

Used by make_esm2_tokenizer.py and make_amplify_tokenizer.py (run from this folder, which puts it on the path).
"""

import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors


def character_tokenizer(
    vocab: list[str], specials: list[str], start: str, end: str, model_max_length: int, **named: str
) -> PreTrainedTokenizerFast:
    """A fast WordLevel tokenizer over `vocab` (ids in its order); `named` gives the roles (pad_token="<pad>", ...)."""
    ids = {token: index for index, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{start} $A {end}",
        pair=f"{start} $A {end} $B:1 {end}:1",
        special_tokens=[(start, ids[start]), (end, ids[end])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **named)


def save(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Write the tokenizer files, naming the public class so that every transformers release loads them."""
    tokenizer.save_pretrained(out)
    config_file = out / "tokenizer_config.json"  # transformers 5 writes its internal class name
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {sorted(p.name for p in out.iterdir())}")
