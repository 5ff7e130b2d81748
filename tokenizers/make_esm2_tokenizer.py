"""Regenerate the shipped ESM-2 tokenizer files in tokenizers/esm2/ (run once; the output is committed).

The vocabulary is the ESM-2 alphabet in the order of the public checkpoints (ids 0..32). Each residue is one token;
`<cls>` and `<eos>` wrap every sequence; characters outside the alphabet become `<unk>`. It is a Rust `tokenizers`
tokenizer, so `AutoTokenizer.from_pretrained("tokenizers/esm2")` gives a fast tokenizer that batch-encodes
millions of residues per second with no network access.
"""

from pathlib import Path

from character_tokenizer import character_tokenizer, save
from transformers import PreTrainedTokenizerFast

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
    return character_tokenizer(
        ESM2_ALPHABET,
        ["<cls>", "<pad>", "<eos>", "<unk>", "<mask>"],
        "<cls>",
        "<eos>",
        1026,
        cls_token="<cls>",
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


if __name__ == "__main__":
    save(build_tokenizer(), Path(__file__).resolve().parent / "esm2")
