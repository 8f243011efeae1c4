"""Naive Bayes + EM over an unlabelled corpus (graftline.nb_em): EM learns the words the labels
never show, beats naive Bayes alone on the real reviews' test split, decodes token ids back
to texts, and refuses labels it cannot use."""

from __future__ import annotations

import numpy as np
import pytest

from graftline.config import FineFoodSource, TokenizerParams
from graftline.data.text import encode, load_fine_food, token_spec, train_tokenizer
from graftline.nb_em import decode_texts, fit_nb_em, nb_em_proba


def _reviews(rng: np.random.Generator, cls: int, words: range, n: int) -> list[str]:
    side = "pos" if cls == 0 else "neg"
    return [
        " ".join([f"{side}{w}" for w in rng.choice(list(words), 4)] + ["the", "and"])
        for _ in range(n)
    ]


def test_em_learns_from_the_corpus_the_words_the_labels_never_show() -> None:
    rng = np.random.default_rng(0)
    # labelled reviews use words 0-4 of their class; the corpus mixes them with words 5-29,
    # and the test reviews use words 5-29 only: naive Bayes alone has never seen them
    texts = _reviews(rng, 0, range(5), 5) + _reviews(rng, 1, range(5), 5)
    labels = np.array([0] * 5 + [1] * 5)
    corpus = [
        f"{a} {b}"
        for cls in (0, 1)
        for a, b in zip(
            _reviews(rng, cls, range(5), 200), _reviews(rng, cls, range(5, 30), 200), strict=True
        )
    ]
    test = _reviews(rng, 0, range(5, 30), 50) + _reviews(rng, 1, range(5, 30), 50)
    truth = np.array([0] * 50 + [1] * 50)

    em = fit_nb_em(texts, labels, corpus, 2, min_df=1)
    alone = fit_nb_em(texts, labels, corpus, 2, min_df=1, rounds=0)
    assert np.mean(nb_em_proba(em, test).argmax(1) == truth) >= 0.95
    assert np.mean(nb_em_proba(alone, test).argmax(1) == truth) <= 0.7

    sharp, soft = nb_em_proba(em, test[:5]), nb_em_proba(em, test[:5], temperature=4.0)
    assert np.allclose(soft.sum(1), 1) and (soft.max(1) <= sharp.max(1) + 1e-12).all()


def test_em_beats_naive_bayes_alone_on_the_testing_reviews() -> None:
    train, test = load_fine_food(FineFoodSource(kind="fine_food"))
    rng = np.random.default_rng(0)
    labels = np.asarray(train.labels)
    drawn = np.concatenate(
        [rng.choice(np.flatnonzero(labels == k), 100, replace=False) for k in (0, 1)]
    )
    texts = [train.images[i] for i in drawn]
    corpus = list(train.images)  # the training reviews, their labels thrown away
    em = fit_nb_em(texts, labels[drawn], corpus, 2)
    alone = fit_nb_em(texts, labels[drawn], corpus, 2, rounds=0)
    truth = np.asarray(test.labels)
    acc_em = np.mean(nb_em_proba(em, list(test.images)).argmax(1) == truth)
    acc_alone = np.mean(nb_em_proba(alone, list(test.images)).argmax(1) == truth)
    majority = np.mean(truth == np.bincount(truth).argmax())  # 0.658
    assert acc_em > max(acc_alone, majority) + 0.02, (acc_em, acc_alone, majority)


def test_token_ids_decode_back_to_their_texts() -> None:
    texts = ["a fine tea, not bitter", "stale crackers 😞", "日本のお茶", "ok"] * 3
    p = TokenizerParams(vocab_size=300, min_frequency=1, max_len=32)
    tok = train_tokenizer(texts, p)
    spec = token_spec(tok, p, 0)
    ids, _ = encode(tok, texts, p.max_len, spec["pad_id"])
    assert decode_texts(ids, spec) == texts
    assert decode_texts(ids, spec, np.array([2, 1])) == [texts[2], texts[1]]


@pytest.mark.parametrize(
    ("texts", "labels", "message"),
    [
        (["a", "b"], [0], "2 texts for 1 labels"),
        ([], [], "at least one labelled text"),
        (["a", "b"], [0, 2], r"labels must lie in 0\.\.1"),
    ],
)
def test_labels_it_cannot_use_are_refused(texts: list, labels: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_nb_em(texts, np.array(labels, dtype=np.int64), ["a b"], 2)
