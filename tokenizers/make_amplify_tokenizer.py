"""Regenerate the shipped AMPLIFY tokenizer files in tokenizers/amplify/ (run once; the output is committed).

The vocabulary is AMPLIFY's (chandar-lab/AMPLIFY, conf/tokenizer/amplify_vocab.txt) in its order, ids 0..26:
`<pad> <unk> <mask> <bos> <eos> |` then `L A G V S E R T I D P K Q N F Y M H W C B`. Each residue is one token,
`<bos>` and `<eos>` wrap every sequence and characters outside the vocabulary become `<unk>`. `|` (chain separator)
is an ordinary token, as in AMPLIFY, whose special tokens are the five in angle brackets. It is a Rust `tokenizers`
tokenizer, so `AutoTokenizer.from_pretrained("tokenizers/amplify")` gives a fast tokenizer with no network access.
"""

import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

SPECIAL_TOKENS = ["<pad>", "<unk>", "<mask>", "<bos>", "<eos>"]
AMPLIFY_VOCAB = [*SPECIAL_TOKENS, "|", *"LAGVSERTIDPKQNFYMHWCB"]
MODEL_MAX_LENGTH = 2048


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(AMPLIFY_VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        pair="<bos> $A <eos> $B:1 <eos>:1",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=MODEL_MAX_LENGTH,
    )


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "amplify"
    build_tokenizer().save_pretrained(out)
    # transformers 5 writes its internal class name; the public alias loads with every transformers release.
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {sorted(p.name for p in out.iterdir())}")
