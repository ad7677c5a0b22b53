"""The embedded model's word-level tokenizer: one token per word, punctuation mark and digit of
the prompts, the response format intact after decoding (the reward parses it), token ids and
vocabulary size carried into the model config."""

from megatron_papo.reward import score
from megatron_papo.models.qwen2_5_vl.tiny import build_word_tokenizer, sized_hf_config, with_tokenizer


def test_word_tokenizer_round_trips_the_response_format():
    tok = build_word_tokenizer(["How many shapes are in the image?"])
    assert len(tok) < 40
    ids = tok("How many shapes are in the image?")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["How", "many", "shapes", "are", "in", "the",
                                              "image", "?"]
    response = tok("<think> </think> \\boxed{12}<|im_end|>")["input_ids"]
    assert tok.convert_ids_to_tokens(response) == ["<think>", "</think>", "\\boxed{", "1", "2",
                                                   "}", "<|im_end|>"]
    text = tok.decode(response, skip_special_tokens=True)
    assert text == "<think></think>\\boxed{12}"
    assert score(text, "12").reward == 1.0
    assert tok.convert_ids_to_tokens(tok("zebra")["input_ids"]) == ["<unk>"]


def test_config_follows_the_tokenizer():
    tok = build_word_tokenizer(["count the dots"])
    config = with_tokenizer(sized_hf_config(64, 2), tok)
    assert config["text_config"]["vocab_size"] % 8 == 0
    assert config["text_config"]["vocab_size"] >= len(tok)
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config["text_config"]["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
