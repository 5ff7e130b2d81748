from conftest import RECIPE_DIR
from transformers import AutoTokenizer

ESM2_ALPHABET = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]


def test_vocabulary_matches_public_esm2_checkpoints(tokenizer):
    assert len(tokenizer) == 33
    assert tokenizer.convert_ids_to_tokens(list(range(33))) == ESM2_ALPHABET
    assert (tokenizer.cls_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert (tokenizer.unk_token_id, tokenizer.mask_token_id) == (3, 32)


def test_known_sequence_ids(tokenizer):
    # <cls> M K T A Y I A K Q R <eos>
    assert tokenizer("MKTAYIAKQR")["input_ids"] == [0, 20, 15, 11, 5, 19, 12, 5, 15, 16, 10, 2]


def test_unknown_characters_become_unk_and_special_tokens_stay_whole(tokenizer):
    ids = tokenizer("AJ<mask>*C")["input_ids"]
    assert ids == [0, 5, 3, 32, 3, 23, 2]


def test_batch_encoding_and_decoding_round_trip(tokenizer):
    sequences = ["MKV", "ACDEFGHIKLMNPQRSTVWY"]
    encoded = tokenizer(sequences)["input_ids"]
    assert [len(ids) for ids in encoded] == [5, 22]
    decoded = [tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") for ids in encoded]
    assert decoded == sequences


def test_tokenizer_loads_offline_from_the_shipped_folder():
    loaded = AutoTokenizer.from_pretrained(RECIPE_DIR / "tokenizers" / "esm2")
    assert loaded.model_max_length == 1026
    assert loaded.is_fast
