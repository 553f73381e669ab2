"""Which emotion a text expresses, judged by something other than the model under study.

Two judges, both fitted and scored on labelled sentences (:mod:`neuronatlas.data.emotions`):

- :func:`lexicon_label`: the emotion with the most words in the NRC lexicon (``neutral`` when the
  text has none of the six);
- :class:`EmotionClassifier`: a scikit-learn logistic regression on word 1-2-gram TF-IDF features
  plus the text's NRC category counts (so emotion words unseen in training still count), with a
  ``neutral`` class.

    >>> from neuronatlas.data.emotions import build_emotion_sentences
    >>> from neuronatlas.evaluate.emotion import EmotionClassifier, lexicon_label
    >>> rows = build_emotion_sentences(seed=0)
    >>> train = [r for r in rows if r["split"] == "identify"]
    >>> test = [r for r in rows if r["split"] == "test"]
    >>> clf = EmotionClassifier().fit([r["text"] for r in train], [r["label"] for r in train])
    >>> 0.0 <= clf.score([r["text"] for r in test], [r["label"] for r in test]) <= 1.0
    True
    >>> lexicon_label("I was so happy and proud")
    'joy'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from neuronatlas.data.emotions import EMOTIONS, NEUTRAL, nrc_lexicon
from neuronatlas.errors import DatasetError

__all__ = ["EmotionClassifier", "lexicon_counts", "lexicon_label", "CATEGORIES"]

CATEGORIES: tuple[str, ...] = (*EMOTIONS, "anticipation", "trust", "positive", "negative")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def lexicon_counts(texts: Sequence[str]) -> np.ndarray:
    """(texts, len(CATEGORIES)) counts of NRC words per category."""
    lex = nrc_lexicon()
    out = np.zeros((len(texts), len(CATEGORIES)), dtype=np.float64)
    col = {c: i for i, c in enumerate(CATEGORIES)}
    for n, text in enumerate(texts):
        for word in _WORD.findall(text.lower()):
            for cat in lex.get(word, ()):
                if cat in col:
                    out[n, col[cat]] += 1
    return out


def lexicon_label(text: str) -> str:
    """The emotion (of the six) with the most NRC words in ``text``; ties go to the first in
    :data:`EMOTIONS` order; ``neutral`` when there is none."""
    counts = lexicon_counts([text])[0, : len(EMOTIONS)]
    return EMOTIONS[int(counts.argmax())] if counts.max() > 0 else NEUTRAL


class EmotionClassifier:
    """Logistic probe on TF-IDF word n-grams + NRC counts. ``fit`` returns ``self``; fitted
    attributes end in ``_`` (scikit-learn conventions)."""

    def __init__(self, *, C: float = 4.0, seed: int = 0) -> None:
        self.C = C
        self.seed = seed

    def _features(self, texts: Sequence[str], fit: bool = False) -> Any:
        from scipy import sparse

        tf = self.vectorizer_.fit_transform(texts) if fit else self.vectorizer_.transform(texts)
        lex = sparse.csr_matrix(np.log1p(lexicon_counts(texts)))
        return sparse.hstack([tf, lex]).tocsr()

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> EmotionClassifier:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        if len(set(labels)) < 2:
            raise DatasetError(f"the emotion classifier needs at least two labels; got {sorted(set(labels))}")
        self.vectorizer_ = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
        self.model_ = LogisticRegression(C=self.C, max_iter=2000, random_state=self.seed)
        self.model_.fit(self._features(texts, fit=True), list(labels))
        self.classes_: list[str] = [str(c) for c in self.model_.classes_]
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(texts, classes) probabilities, columns in ``classes_`` order."""
        if not texts:
            return np.zeros((0, len(self.classes_)))
        return np.asarray(self.model_.predict_proba(self._features(texts)))

    def predict(self, texts: Sequence[str]) -> list[str]:
        if not texts:
            return []
        return [str(c) for c in self.model_.predict(self._features(texts))]

    def score(self, texts: Sequence[str], labels: Sequence[str]) -> float:
        """Accuracy on labelled texts."""
        pred = self.predict(texts)
        return float(np.mean([p == y for p, y in zip(pred, labels)])) if pred else float("nan")

    def expresses(self, texts: Sequence[str], emotion: str) -> list[int]:
        """1 where the predicted class is ``emotion``."""
        return [int(p == emotion) for p in self.predict(texts)]
