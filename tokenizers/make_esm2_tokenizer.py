"""Regenerate the shipped ESM-2 tokenizer files in tokenizers/esm2/ (run once; the output is committed).

The vocabulary is the ESM-2 alphabet in the order of the public checkpoints (ids 0..32). Each residue is one token;
`<cls>` and `<eos>` wrap every sequence; characters outside the alphabet become `<unk>`. It is a Rust `tokenizers`
tokenizer, so `AutoTokenizer.from_pretrained("tokenizers/esm2")` gives a fast tokenizer that batch-encodes
millions of residues per second with no network access.
"""

import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

ESM2_ALPHABET = [
    "<cls>",
    "<pad>",
    "<eos>",
    "<unk>",
    "L",
    "A",
    "G",
    "V",
    "S",
    "E",
    "R",
    "T",
    "I",
    "D",
    "P",
    "K",
    "Q",
    "N",
    "F",
    "Y",
    "M",
    "H",
    "W",
    "C",
    "X",
    "B",
    "U",
    "Z",
    "O",
    ".",
    "-",
    "<null_1>",
    "<mask>",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(ESM2_ALPHABET)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tokenizer.add_special_tokens(["<cls>", "<pad>", "<eos>", "<unk>", "<mask>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<cls> $A <eos>",
        pair="<cls> $A <eos> $B:1 <eos>:1",
        special_tokens=[("<cls>", vocab["<cls>"]), ("<eos>", vocab["<eos>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        cls_token="<cls>",
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=1026,
    )


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "esm2"
    build_tokenizer().save_pretrained(out)
    # transformers 5 writes its internal class name; the public alias loads with every transformers release.
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {sorted(p.name for p in out.iterdir())}")
