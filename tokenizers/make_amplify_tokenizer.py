"""Regenerate the shipped AMPLIFY tokenizer files in tokenizers/amplify/ (run once; the output is committed).

The vocabulary is AMPLIFY's (chandar-lab/AMPLIFY, conf/tokenizer/amplify_vocab.txt) in its order, ids 0..26:
`<pad> <unk> <mask> <bos> <eos> |` then `L A G V S E R T I D P K Q N F Y M H W C B`. Each residue is one token,
`<bos>` and `<eos>` wrap every sequence and characters outside the vocabulary become `<unk>`. `|` (chain separator)
is an ordinary token, as in AMPLIFY, whose special tokens are the five in angle brackets. It is a Rust `tokenizers`
tokenizer, so `AutoTokenizer.from_pretrained("tokenizers/amplify")` gives a fast tokenizer with no network access.
"""

from pathlib import Path

from character_tokenizer import character_tokenizer, save
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<mask>", "<bos>", "<eos>"]
AMPLIFY_VOCAB = [*SPECIAL_TOKENS, "|", *"LAGVSERTIDPKQNFYMHWCB"]
MODEL_MAX_LENGTH = 2048


def build_tokenizer() -> PreTrainedTokenizerFast:
    return character_tokenizer(
        AMPLIFY_VOCAB,
        SPECIAL_TOKENS,
        "<bos>",
        "<eos>",
        MODEL_MAX_LENGTH,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


if __name__ == "__main__":
    save(build_tokenizer(), Path(__file__).resolve().parent / "amplify")
