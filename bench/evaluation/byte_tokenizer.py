"""A byte-level tokenizer built in code: what runs with random weights when no checkpoint (and so
no real tokenizer) is given. Ids 0..2 are Ouro's special tokens, then one id per byte (259 in
all), so any text round-trips and every preset's vocabulary holds it. `load_tokenizer` picks
between it and a real one."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[char] = len(SPECIAL_TOKENS) + index
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:],
    )


def load_tokenizer(weights: str | None, tokenizer: str | None):
    """The tokenizer to use: --tokenizer, else the checkpoint's, else the built-in byte tokenizer
    (random weights have no tokenizer of their own)."""
    source = tokenizer or weights
    if source is None:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)
