"""Generation metrics: VQA normalisation, CIDEr on our own tokenization, shapes attributes,
and fidelity between two runs."""

from __future__ import annotations

import pytest
import torch

from vlcompress.eval.generative import (
    GenerativeRun,
    caption_attributes,
    check_caption_metric,
    cider,
    generative_fidelity,
    generative_metrics,
    normalize_answer,
    tokenize_caption,
)


def test_vqa_normalisation_and_accuracy():
    assert normalize_answer("The Red one.") == "red 1"  # number words as digits, as VQA does
    assert normalize_answer("Two") == normalize_answer("2") == "2"
    run = GenerativeRun("vqa", [[1], [2], [3]], ["Red.", "a circle", "top"],
                        [["red"], ["square", "circle"], ["top left"]])
    assert generative_metrics(run) == {"vqa_accuracy": pytest.approx(2 / 3)}


def test_cider_ranks_a_matching_caption_above_a_wrong_one():
    refs = [["a small red circle at the top left"], ["a large blue square in the center"],
            ["a small green star at the bottom right"]]
    good = cider(["A small red circle, at the top left!", "a large blue square in the center",
                  "a small green star at the bottom right"], refs)
    bad = cider(["a large blue square in the center"] * 3, refs)
    assert good > 2 * bad > 0.0  # CIDEr-D: an exact match of one reference scores 10
    assert tokenize_caption("A red, circle!") == "a red circle"


def test_caption_attributes_need_all_four():
    assert caption_attributes("a small red circle at the top left") == {
        "size": "small", "color": "red", "shape": "circle", "position": "top left"}
    assert caption_attributes("a red circle") is None
    run = GenerativeRun("caption", [[1], [2]], ["a small red circle at the top left", "a red star"],
                        [["a red circle", "a small red circle at the top left"],
                         ["a large red star in the center"]])
    m = generative_metrics(run)
    assert m["attribute_accuracy"] == 0.5 and m["cider"] > 0


def test_fidelity_of_identical_and_different_runs():
    lp = torch.log_softmax(torch.randn(3, 5), -1)
    dense = GenerativeRun("vqa", [[1, 2, 3], []], ["", ""], [[], []], [lp], 2)
    same = generative_fidelity(dense, dense)
    assert same == {"token_kl": pytest.approx(0.0, abs=1e-6), "next_token_agreement": 1.0,
                    "greedy_agreement": 1.0}
    other = GenerativeRun("vqa", [[1, 9], [4]], ["", ""], [[], []],
                          [torch.log_softmax(torch.randn(3, 5), -1)], 2)
    f = generative_fidelity(dense, other)
    assert f["token_kl"] > 0 and f["greedy_agreement"] == pytest.approx(1 / 4)


def test_caption_metric_of_questions_only_data_is_refused():
    from vlcompress.errors import ConfigError

    with pytest.raises(ConfigError, match="metric cider needs captions"):
        check_caption_metric("cider", "my_vqa (vqa)")
    check_caption_metric("cider", "caps (caption) + caps (vqa)")
    check_caption_metric("vqa_accuracy", "my_vqa (vqa)")
