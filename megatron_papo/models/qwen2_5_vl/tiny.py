"""Tiny Qwen2.5-VL checkpoints built locally (no hub): random weights, a BPE tokenizer trained on
generated text with Qwen2-VL's special tokens and chat template, and a Qwen2.5-VL processor, so
that ``from_pretrained`` of transformers, ``AutoProcessor`` and vLLM work offline. The default
(CPU) training job builds its model here (``model.hf_dir`` unset); the tests use it too."""

from __future__ import annotations

import copy
import os
import random
import re

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320  # 256 byte tokens + 54 BPE merges + the special tokens (+ 3 unused rows)
# ids of the special tokens in the tiny vocabulary (the real model: 151643...)
SPECIAL_TOKENS = {
    "<|vision_start|>": 310, "<|vision_end|>": 311, "<|image_pad|>": 312, "<|video_pad|>": 313,
    "<|endoftext|>": 314, "<|im_start|>": 315, "<|im_end|>": 316,
}
IMAGE_TOKEN, VIDEO_TOKEN = SPECIAL_TOKENS["<|image_pad|>"], SPECIAL_TOKENS["<|video_pad|>"]
VISION_START, VISION_END = SPECIAL_TOKENS["<|vision_start|>"], SPECIAL_TOKENS["<|vision_end|>"]
EOS, IM_START, IM_END = (SPECIAL_TOKENS[t] for t in ("<|endoftext|>", "<|im_start|>",
                                                      "<|im_end|>"))

# Qwen2-VL's chat template, shortened to what images + text need.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_BASE_CONFIG = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "text_config": {
        # head_dim 32: vLLM's CPU attention kernels do not take 16
        "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                            "mrope_section": [4, 6, 6]},
        "bos_token_id": EOS, "eos_token_id": IM_END, "pad_token_id": EOS,
    },
    "vision_config": {
        "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
        "out_hidden_size": 128, "patch_size": 14, "temporal_patch_size": 2,
        "spatial_merge_size": 2, "window_size": 56, "fullatt_block_indexes": [1],
        "in_channels": 3, "tokens_per_second": 2,
    },
    "image_token_id": IMAGE_TOKEN, "video_token_id": VIDEO_TOKEN,
    "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END,
    "tie_word_embeddings": False,
}


def tiny_hf_config(tied: bool = False, layers: int = 4, **text_overrides) -> dict:
    """transformers-5 (nested) layout of a tiny Qwen2.5-VL config (depth-2 vision tower whose
    window (56 px = 2x2 merge units) and ``fullatt_block_indexes`` [1] exercise both attention
    kinds)."""
    config = copy.deepcopy(_BASE_CONFIG)
    config["tie_word_embeddings"] = tied
    config["text_config"]["num_hidden_layers"] = layers
    config["text_config"].update(text_overrides)
    return config


def sized_hf_config(hidden: int, layers: int, head_dim: int = 32, kv_heads: int | None = None,
                    intermediate: int | None = None, vision_hidden: int | None = None,
                    vocab: int = VOCAB, initializer_range: float | None = None,
                    tied: bool = False) -> dict:
    """A tiny config scaled to ``hidden``/``layers`` with everything that must follow kept
    consistent: heads from ``head_dim`` (vLLM's CPU attention needs >= 32), the MRoPE sections
    (summing to head_dim / 2), the vision tower's output width (= hidden), its heads, and the
    initializer range on both towers."""
    heads = max(1, hidden // head_dim)
    quarter = head_dim // 8
    text = dict(hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                vocab_size=vocab,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [quarter, (head_dim // 2 - quarter) // 2,
                                                   (head_dim // 2 - quarter) // 2]})
    if initializer_range is not None:
        text["initializer_range"] = initializer_range
    config = tiny_hf_config(tied, layers=layers, **text)
    vision = config["vision_config"]
    vision["out_hidden_size"] = hidden
    if vision_hidden is not None:
        vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=max(1, vision_hidden // 32))
    if initializer_range is not None:
        vision["initializer_range"] = initializer_range
        config["initializer_range"] = initializer_range
    return config


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "area", "of", "triangle", "is", "answer", "boxed", "circle", "radius",
             "angle", "degrees", "think", "so", "we", "get", "image", "shows", "value", "sum"]
    lines = []
    for _ in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        answer = rng.randint(0, 99)
        lines.append(f"{body} {rng.randint(0, 999)} <think>{body}</think> \\boxed{{{answer}}}")
    return lines


def build_tokenizer():
    """A byte-level BPE tokenizer with VOCAB - len(SPECIAL_TOKENS) - 1 learned tokens and the
    special tokens at the ids of :data:`SPECIAL_TOKENS`."""
    from transformers import PreTrainedTokenizerFast  # seconds: only building the files needs it

    learned = min(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=learned, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    assert tok.get_vocab_size() <= learned, tok.get_vocab_size()
    while tok.get_vocab_size() < learned:  # pad the learned part so special ids are fixed
        tok.add_tokens([f"<|unused{tok.get_vocab_size()}|>"])
    for token, token_id in sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([token])
        assert tok.token_to_id(token) == token_id, (token, tok.token_to_id(token))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


WORD_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# added (non-special) tokens: kept by skip_special_tokens, so the reward sees them
WORD_FORMAT_TOKENS = ("<think>", "</think>", "\\boxed{", "}")


def build_word_tokenizer(texts: list[str] = ()):
    """A word-level tokenizer: one token per word, punctuation mark and digit of ``texts`` (e.g.
    the prompts of a dataset), the chat roles, the response format (``<think>``, ``</think>``,
    ``\\boxed{``, ``}``, digits) and the special tokens (ids 0-6). A tiny model learns its
    tasks far faster on such a vocabulary (~35 tokens for the counting task) than on bytes. Decoding
    concatenates tokens without spaces (``<think></think>\\boxed{12}``): answers stay intact;
    prose inside ``<think>`` reads run together, which the grader ignores."""
    from transformers import PreTrainedTokenizerFast  # seconds: only building the files needs it

    split = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
        pre_tokenizers.Digits(individual_digits=True)])
    words = {"system", "user", "assistant"} | set("0123456789")
    pattern = "|".join(re.escape(t) for t in WORD_FORMAT_TOKENS + WORD_SPECIALS)
    for text in texts:
        for piece in re.split(pattern, text):
            words.update(w for w, _ in split.pre_tokenize_str(piece))
    vocab = {t: i for i, t in enumerate(WORD_SPECIALS + ("<unk>",) + WORD_FORMAT_TOKENS
                                        + tuple(sorted(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in WORD_SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in WORD_FORMAT_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def with_tokenizer(config: dict, tokenizer, vocab_multiple: int = 8) -> dict:
    """``config`` (a tiny HF config) re-keyed to ``tokenizer``'s special-token ids, with its
    vocabulary rounded up to ``vocab_multiple`` rows (TP must divide it)."""
    config = copy.deepcopy(config)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    config["text_config"].update(
        vocab_size=-(-len(tokenizer) // vocab_multiple) * vocab_multiple,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"])
    return config


def build_processor(tokenizer=None, min_pixels: int = 56 * 56, max_pixels: int = 224 * 224):
    # transformers (seconds to import): only building the files needs it
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = tokenizer or build_tokenizer()
    image = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                  temporal_patch_size=2, merge_size=2)
    video = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                               chat_template=CHAT_TEMPLATE)


def reference_model(hf_config: dict, seed: int = 0):
    """transformers' Qwen2.5-VL with random weights (norm weights and biases random too, so that
    a mapping mistake cannot hide behind ones and zeros)."""
    # transformers (seconds to import): only the reference model needs it
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def write_tiny_checkpoint(folder: str, tied: bool = False, dtype: torch.dtype = torch.bfloat16,
                          seed: int = 0, max_shard_size: str = "50MB",
                          hf_config: dict | None = None, tokenizer=None, **config_overrides):
    """A complete HF folder: config, generation config, weights, tokenizer and processor.
    ``hf_config`` (e.g. from :func:`sized_hf_config`) replaces the tiny config; ``tokenizer``
    (e.g. from :func:`build_word_tokenizer`) replaces the BPE one, the config's token ids and
    vocabulary size following it."""
    config = hf_config if hf_config is not None else tiny_hf_config(tied, **config_overrides)
    if tokenizer is not None:
        config = with_tokenizer(config, tokenizer)
    model = reference_model(config, seed).to(dtype)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    build_processor(tokenizer).save_pretrained(folder)
    return model
