"""The word-level tokenizer of the embedded shapes models (built, never downloaded)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from . import shapes

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"


def build_shapes_tokenizer(max_length: int = 16) -> PreTrainedTokenizerFast:
    """A lower-casing whitespace tokenizer over the shapes vocabulary.

    Ids: pad 0, unk 1, bos 2, eos 3 (CLIP pools the first eos; an eos id of 2 would switch
    HF CLIP to its legacy argmax pooling, so it is 3).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {PAD: 0, UNK: 1, BOS: 2, EOS: 3}
    for w in shapes.vocabulary():
        vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 2), (EOS, 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        model_max_length=max_length,
    )
