"""Chat templates that write the BOS token themselves (``{{ bos_token }}``, as most hub LLaMA
templates do) with a tokenizer that also adds BOS: every sequence starts with exactly one."""

from __future__ import annotations

import pytest
import torch
from llava_factory import make_tiny_llava_folder

from vlcompress.data import load_calibration
from vlcompress.models import load_model
from vlcompress.models.llava import WORD_CHAT_TEMPLATE, adds_bos, single_bos


@pytest.fixture(scope="module")
def batch():
    return next(iter(load_calibration("shapes", n=2, batch_size=2).batches()))


def _bos_counts(ids: torch.Tensor, mask: torch.Tensor, bos: int) -> list[int]:
    return [int((row[m.bool()] == bos).sum()) for row, m in zip(ids, mask, strict=True)]


def test_template_bos_and_tokenizer_bos_give_one_bos(tmp_path, batch):
    plain = load_model(str(make_tiny_llava_folder(tmp_path)))
    tok = plain.tokenizer
    assert adds_bos(tok)  # the test needs a tokenizer that adds BOS itself
    bos_vlm = load_model(str(make_tiny_llava_folder(tmp_path, name="bos")))
    bos_vlm.processor.chat_template = "{{ bos_token }}" + WORD_CHAT_TEMPLATE
    raw = bos_vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True, tokenize=False)
    assert raw.startswith(tok.bos_token)  # the template really writes BOS
    # without the fix the processor would give two BOS tokens
    assert _bos_counts(*(lambda e: (e["input_ids"], e["attention_mask"]))(
        bos_vlm.processor(images=list(batch.images), text=[raw] * 2, return_tensors="pt")),
        tok.bos_token_id) == [2, 2]
    enc, ref = bos_vlm.encode(batch), plain.encode(batch)
    assert _bos_counts(enc["input_ids"], enc["attention_mask"], tok.bos_token_id) == [1, 1]
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    assert torch.equal(enc["target_mask"], ref["target_mask"])
    assert bos_vlm.prompt("what color is it ?") == plain.prompt("what color is it ?")
    assert bos_vlm.generate(batch.images, max_new_tokens=3) == \
        plain.generate(batch.images, max_new_tokens=3)


def test_single_bos_keeps_text_when_the_tokenizer_adds_none(tmp_path):
    tok = load_model(str(make_tiny_llava_folder(tmp_path))).tokenizer
    assert single_bos(tok, "<s>user : hi") == "user : hi"
    assert single_bos(tok, "user : <s> hi") == "user : <s> hi"  # only a leading BOS goes
    tok._tokenizer.post_processor = None  # now the tokenizer adds nothing
    assert not adds_bos(tok)
    assert single_bos(tok, "<s>user : hi") == "<s>user : hi"
