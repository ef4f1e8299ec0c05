"""The official P-Tuning metrics (THUDM ``ptuning/main.py`` ``compute_metrics``), averaged over rows.

ROUGE-1/2/L: ``rouge_chinese`` F-scores x 100 on jieba words; BLEU-4: nltk ``sentence_bleu`` on
characters with ``SmoothingFunction().method3``, x 100; each row's score rounded to 4 places as the
official code does.  A row whose prediction or label is empty scores 0 (the official code crashes on
it with "Hypothesis is empty").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _words(text: str) -> str:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter is not for our users
    return " ".join(jieba.cut(text))


def score_row(prediction: str, label: str) -> dict[str, float]:
    """The four scores of one prediction against its label."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis, reference = _words(prediction), _words(label)
    if not hypothesis.strip() or not reference.strip():
        return dict.fromkeys(KEYS, 0.0)
    try:
        rouge = Rouge().get_scores(hypothesis, reference)[0]
    except ValueError:  # nothing left to compare once rouge_chinese drops what it does not count
        return dict.fromkeys(KEYS, 0.0)
    scores = {key: round(rouge[key]["f"] * 100, 4) for key in KEYS[:3]}
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(float(bleu) * 100, 4)
    return scores


def compute_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """``{"rouge-1", "rouge-2", "rouge-l", "bleu-4"}``, each the mean over rows (0 for no rows)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    rows = [score_row(prediction, label) for prediction, label in zip(predictions, labels, strict=True)]
    return {key: sum(row[key] for row in rows) / len(rows) if rows else 0.0 for key in KEYS}
