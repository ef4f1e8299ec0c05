"""The official P-Tuning metrics on fixed strings, against values worked out by hand.

rouge_chinese scores distinct n-grams (sets) of jieba words; BLEU-4 counts clipped character n-grams.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from glmkit.train.metrics import compute_metrics, score_row


def plain_bleu4(hypothesis: str, reference: str) -> float:
    """BLEU-4 x 100 on characters, counted here by hand (no smoothing: every precision is above 0)."""
    precisions = []
    for n in range(1, 5):
        hyp = Counter(hypothesis[i : i + n] for i in range(len(hypothesis) - n + 1))
        ref = Counter(reference[i : i + n] for i in range(len(reference) - n + 1))
        precisions.append(sum(min(count, ref[gram]) for gram, count in hyp.items()) / sum(hyp.values()))
    brevity = min(1.0, math.exp(1 - len(reference) / len(hypothesis)))
    return 100 * brevity * math.exp(sum(math.log(p) for p in precisions) / 4)


def test_chinese_prefix():
    # jieba: 我/爱/北京 against 我/爱/北京/天安门
    scores = score_row("我爱北京", "我爱北京天安门")
    f1 = 2 * 1 * (3 / 4) / (1 + 3 / 4)  # precision 3/3, recall 3/4
    assert scores["rouge-1"] == pytest.approx(round(100 * f1, 4))  # 85.7143
    assert scores["rouge-2"] == pytest.approx(80.0)  # bigrams: precision 2/2, recall 2/3
    assert scores["rouge-l"] == pytest.approx(round(100 * f1, 4))  # LCS of 3 words
    # every character n-gram of the hypothesis matches; brevity penalty exp(1 - 7/4)
    assert scores["bleu-4"] == pytest.approx(round(100 * math.exp(-0.75), 4))  # 47.2367


def test_english_sentence():
    scores = score_row("the cat sat on the mat", "the cat is on the mat")
    assert scores["rouge-1"] == pytest.approx(80.0)  # distinct words: 4 of 5 on each side
    assert scores["rouge-2"] == pytest.approx(60.0)  # the cat, on the, the mat: 3 of 5
    assert scores["rouge-l"] == pytest.approx(round(100 * 5 / 6, 4))  # LCS "the cat on the mat"
    assert scores["bleu-4"] == pytest.approx(plain_bleu4("the cat sat on the mat", "the cat is on the mat"), abs=1e-4)


def test_characters_only_overlap():
    scores = score_row("abcde", "abcdf")  # one word each, different: no ROUGE
    assert scores["rouge-1"] == scores["rouge-2"] == scores["rouge-l"] == 0.0
    # precisions 4/5, 3/4, 2/3, 1/2 -> (1/5) ** (1/4)
    assert scores["bleu-4"] == pytest.approx(round(100 * 0.2**0.25, 4))  # 66.874


@pytest.mark.parametrize(("prediction", "label"), [("", "我爱北京"), ("   ", "abc"), ("我爱北京", "")])
def test_empty_side_scores_zero(prediction, label):
    assert score_row(prediction, label) == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}


def test_means_over_rows():
    metrics = compute_metrics(["我爱北京", ""], ["我爱北京天安门", "x"])
    assert metrics["rouge-2"] == pytest.approx(40.0)
    assert metrics["bleu-4"] == pytest.approx(round(100 * math.exp(-0.75), 4) / 2)
    assert compute_metrics([], []) == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
