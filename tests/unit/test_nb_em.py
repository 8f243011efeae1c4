"""Naive Bayes + EM over an unlabelled corpus (graftline.nb_em): EM learns the words the labels
never show, beats naive Bayes alone on the real reviews' test split, models a class made of
two kinds of text with two mixture components, decodes token ids back to texts, and refuses
labels and settings it cannot use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from graftline.config import FineFoodSource, NbEmParams, TokenizerParams
from graftline.data.text import encode, load_fine_food, token_spec, train_tokenizer
from graftline.nb_em import (
    NaiveBayesEM,
    decode_texts,
    fit_nb_em,
    fit_temperature,
    nb_em_proba,
    settings,
)


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


def test_a_class_of_two_kinds_needs_two_components() -> None:
    # "one-sided" texts use words of set a only or of set b only; "mixed" texts use both
    # halves: a single multinomial per class sees the same word frequencies in both classes
    rng = np.random.default_rng(0)

    def texts(kind: str, n: int) -> list[str]:
        def words(s: str, k: int) -> list[str]:
            return [f"{s}{w}" for w in rng.choice(10, k)]

        if kind == "mixed":
            return [" ".join(words("a", 4) + words("b", 4)) for _ in range(n)]
        return [" ".join(words("a" if i % 2 else "b", 8)) for i in range(n)]

    labelled = texts("one-sided", 20) + texts("mixed", 20)
    labels = np.array([0] * 20 + [1] * 20)
    corpus = texts("one-sided", 200) + texts("mixed", 200)
    test, truth = texts("one-sided", 50) + texts("mixed", 50), np.array([0] * 50 + [1] * 50)

    def fitted(components: list[int] | None, seed: int = 0) -> NaiveBayesEM:
        return fit_nb_em(
            labelled, labels, corpus, 2, min_df=1, rounds=20, components=components, seed=seed
        )

    def accuracy(em: NaiveBayesEM) -> float:
        return float(np.mean(nb_em_proba(em, test).argmax(1) == truth))

    assert accuracy(fitted(None)) <= 0.6
    for seed in range(3):  # the likeliest of the restarts, whatever the random splits
        assert accuracy(fitted([2, 1], seed)) >= 0.95, seed
    assert np.allclose(fitted([2, 1]).predict_proba(test).sum(1), 1)  # components' summed


def test_components_are_named_by_class() -> None:
    kw = settings(NbEmParams(components={"other": 4}), ["great", "other"], seed=3)
    assert kw["components"] == [1, 4] and kw["seed"] == 3
    with pytest.raises(ValueError, match=r"distill\.nb_em\.components: no class 'bad'"):
        settings(NbEmParams(components={"bad": 2}), ["great", "other"])
    with pytest.raises(ValueError, match="one count >= 1 per class"):
        fit_nb_em(["a", "b"], np.array([0, 1]), [], 2, components=[1])


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


def test_the_word_model_travels_in_a_safe_checkpoint_and_multiplies_the_network(
    tmp_path: Path,
) -> None:
    """``finetune.nb_em``: a classifier carrying naive Bayes + EM saves it as arrays and words
    (``weights_only`` loads it back), predicts the same after the round trip, and its
    probabilities are the normalised product of the network's and the word model's on the
    decoded token ids; the forward pass stays the network's."""
    from graftline.data.modules import Part, TokenData
    from graftline.models import build_classifier, save_checkpoint
    from graftline.models.checkpoint import load_checkpoint
    from graftline.train import predict_proba

    texts = ["a fine tea, not bitter", "stale crackers 😞", "great coffee", "bad stale tea"] * 3
    labels = np.array([0, 1, 0, 1] * 3)
    p = TokenizerParams(vocab_size=300, min_frequency=1, max_len=32)
    tok = train_tokenizer(texts, p)
    spec = token_spec(tok, p, 0)
    ids, _ = encode(tok, texts, p.max_len, spec["pad_id"])
    words = fit_nb_em(texts, labels, texts, 2, min_df=1, components=[1, 2])
    cfg = {
        "arch": "llama",
        "dim": 16,
        "depth": 1,
        "heads": 2,
        "mlp_ratio": 2.0,
        "dropout": 0.0,
        "pool": "last",
        **{k: spec[k] for k in ("vocab_size", "max_len", "pad_id", "bos_id", "eos_id")},
    }
    torch.manual_seed(0)
    model = build_classifier(cfg, 1, p.max_len, 2).eval()
    data = TokenData([Part(ids, labels)], ["great", "other"], spec, spec["pad_id"])
    network = predict_proba(model, data)
    model.words = words
    both = predict_proba(model, data)
    expected = network * words.predict_proba(texts)
    assert np.allclose(both, expected / expected.sum(1, keepdims=True), atol=1e-5)
    assert not np.allclose(both, network, atol=1e-3)

    def saved_and_loaded(name: str) -> torch.nn.Module:
        path = tmp_path / name
        save_checkpoint(
            path,
            model,
            model_config=cfg,
            classes=["great", "other"],
            input_shape=(p.max_len,),
            transform=spec,
        )
        assert torch.load(path, weights_only=True)["nb_em"]["words"] == words.words
        return load_checkpoint(path)[0]

    loaded = saved_and_loaded("model.pt")
    assert loaded.words is not None and loaded.words.words == words.words
    assert loaded.words.size == len(words.words)
    assert np.allclose(loaded.words.predict_proba(texts), words.predict_proba(texts))
    assert np.allclose(predict_proba(loaded, data), both, atol=1e-6)
    soft = predict_proba(loaded, data, temperature=4.0)
    assert np.allclose(soft.sum(1), 1) and (soft.max(1) <= both.max(1) + 1e-6).all()

    # A calibrated word model: its temperature travels in the checkpoint and softens the
    # product as a distillation temperature would, keeping every top class.
    words.temperature = 4.0
    calibrated = saved_and_loaded("calibrated.pt")
    assert calibrated.words.temperature == 4.0
    assert np.allclose(predict_proba(calibrated, data), soft, atol=1e-6)
    assert (predict_proba(calibrated, data).argmax(1) == both.argmax(1)).all()


def test_a_word_model_state_of_another_kind_is_refused() -> None:
    words = fit_nb_em(["good tea", "bad tea"], np.array([0, 1]), [], 2, min_df=1)
    state = words.state()
    with pytest.raises(ValueError, match="not a naive Bayes"):
        NaiveBayesEM.from_state({**state, "format": "other"})
    with pytest.raises(ValueError, match="word weights for"):
        NaiveBayesEM.from_state({**state, "words": state["words"][:-1]})
    with pytest.raises(ValueError, match="temperature 0.0 is not positive"):
        NaiveBayesEM.from_state({**state, "temperature": 0.0})
    older = {k: v for k, v in state.items() if k != "temperature"}
    assert NaiveBayesEM.from_state(older).temperature == 1.0


def test_the_fitted_temperature_calibrates_overconfident_scores() -> None:
    """Scores ten times too sharp (as a product of two models counting the same words is):
    the fitted temperature brings them back, lowers the held-out log-loss, keeps the classes."""
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        logits = rng.normal(0, 1.5, (n, 3))
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        labels = np.array([rng.choice(3, p=row) for row in p])
        return 10 * logits, labels  # calibrated at T = 10

    def log_loss(score: np.ndarray, labels: np.ndarray, t: float) -> float:
        z = score / t
        z = z - z.max(1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        return float(-log_p[np.arange(len(labels)), labels].mean())

    score, labels = draw(400)
    t = fit_temperature(score, labels)
    assert 7 < t < 14, t
    held_out, truth = draw(400)  # judged on other rows than it was fitted on
    assert log_loss(held_out, truth, t) < 0.5 * log_loss(held_out, truth, 1.0)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, np.int64)) == 1.0


def test_finetune_calibrates_its_word_model_on_the_validation_split(tmp_path: Path) -> None:
    """The finetune stage's word model (``finetune.nb_em``): fitted on the labels and the
    stored corpus, then given the temperature that calibrates the product on the validation
    split, where a sixth of the labels contradict the words (as real reviews' do)."""
    from graftline.config import FinetuneParams
    from graftline.data.dataset import Dataset
    from graftline.data.store import save_splits
    from graftline.data.text import tokenize_dataset
    from tasks.finetune import calibrated_word_model

    rng = np.random.default_rng(2)

    def tokenized(texts: list[str], labels: np.ndarray | None) -> Dataset:
        items = np.empty(len(texts), dtype=object)
        items[:] = texts
        if labels is None:  # the corpus: no labels, no classes
            ds = Dataset(items, np.full(len(texts), -1), [], "corpus")
        else:
            ds = Dataset(items, labels, ["great", "other"], "task")
        return tokenize_dataset(ds, tok, spec)[0]

    def reviews(n: int) -> tuple[list[str], np.ndarray]:
        texts = _reviews(rng, 0, range(10), n) + _reviews(rng, 1, range(10), n)
        return texts, np.array([0] * n + [1] * n)

    train_texts, train_y = reviews(20)
    val_texts, val_y = reviews(30)
    val_y = np.where(rng.random(len(val_y)) < 1 / 6, 1 - val_y, val_y)
    corpus_texts, _ = reviews(50)
    p = TokenizerParams(vocab_size=300, min_frequency=1, max_len=32)
    tok = train_tokenizer(train_texts + corpus_texts, p)
    spec = token_spec(tok, p, 0)
    train, val = tokenized(train_texts, train_y), tokenized(val_texts, val_y)
    corpus = tokenized(corpus_texts, None)
    save_splits(tmp_path / "corpus", {"train": corpus}, {})

    params = FinetuneParams(nb_em={"enabled": True, "min_df": 1})
    network = np.full((len(val_y), 2), 0.5, np.float32)  # a network that knows nothing
    words = calibrated_word_model(params, train, val, network, tmp_path / "corpus")
    assert words.temperature > 1.5, words.temperature  # confident and a sixth wrong: softened

    def val_log_loss(t: float) -> float:
        score = words.predict_log_proba(decode_texts(val.images, val.transform)) / t
        score -= score.max(1, keepdims=True)
        log_p = score - np.log(np.exp(score).sum(1, keepdims=True))
        return float(-log_p[np.arange(len(val_y)), val_y].mean())

    assert val_log_loss(words.temperature) < val_log_loss(1.0)
