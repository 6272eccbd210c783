"""The embedded default: a character tokenizer and a tiny Llama, built in code (no download).

Vocabulary ``<pad> <s> </s> <unk> 0-9 + =`` (17 tokens), one token per character, BOS
prepended by the post-processor, a Fuse decoder, wrapped in ``PreTrainedTokenizerFast``
(pad != eos). Model: ``LlamaForCausalLM`` with hidden 64, intermediate 256, 2 layers,
4 heads, tied embeddings (about 130k parameters).
"""
from __future__ import annotations

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARACTERS = tuple("0123456789+=")


def build_tokenizer():
    """The character-level ``PreTrainedTokenizerFast`` of the default task."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # one token per character
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", padding_side="left")


def build_model(tokenizer, *, seed: int = 0, hidden_size: int = 64, intermediate_size: int = 256,
                num_layers: int = 2, num_heads: int = 4):
    """A freshly initialised ``LlamaForCausalLM`` sized for ``tokenizer`` (tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
