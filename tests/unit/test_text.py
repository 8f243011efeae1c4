"""Text data: sources and their checks, the corpus's tokenizer, token ids in the store."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from graftline.config import (
    FineFoodSource,
    TextFolderSource,
    TextTableSource,
    TokenizerParams,
    parse_params,
)
from graftline.data.dataset import Dataset
from graftline.data.modules import TokenData, data_module
from graftline.data.store import TOKENIZER, load_split, save_splits
from graftline.data.text import (
    UNK,
    encode,
    load_fine_food,
    load_text_folder,
    load_text_table,
    token_spec,
    tokenize_dataset,
    train_tokenizer,
)
from graftline.errors import DataError

SCRIPTS = [
    "机器学习很有趣，预训练模型改变了自然语言处理。",
    "事前学習したモデルを微調整します。とても便利です！",
    "Great coffee ☕️😀👍🏽, would buy again — naïve café",
    "mixed 中文 and English と日本語 with emoji 🚀 and tabs\tand ümlauts",
    "한국어 문장도 됩니다. Ελληνικά. Русский текст. עברית. العربية",
]
CORPUS = [
    f"review {i}: the coffee was {'great' if i % 2 else 'bad'} and arrived fast" for i in range(60)
]


def test_text_tables_load_from_csv_jsonl_and_parquet_alike(tmp_path: Path) -> None:
    df = pd.DataFrame({"body": ["good tea", "bad tea", "好茶 😀"], "y": ["pos", "neg", "pos"]})
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_json(tmp_path / "t.jsonl", orient="records", lines=True, force_ascii=False)
    df.to_parquet(tmp_path / "t.parquet")
    loaded = [
        load_text_table(
            TextTableSource(
                kind="text_table",
                path=str(tmp_path / f"t.{ext}"),
                text_column="body",
                label_column="y",
            )
        )
        for ext in ("csv", "jsonl", "parquet")
    ]
    for ds in loaded:
        assert list(ds.images) == df["body"].tolist()
        assert ds.classes == ["neg", "pos"] and ds.labels.tolist() == [1, 0, 1]
    assert loaded[0].ids[0] == "t.csv:row 2" and loaded[1].ids[2] == "t.jsonl:line 3"
    unlabelled = load_text_table(
        TextTableSource(
            kind="text_table", path=str(tmp_path / "t.csv"), text_column="body", labels="ignore"
        )
    )
    assert not unlabelled.labelled


def test_every_bad_row_of_a_text_table_is_named_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    rows = b"text,label\n" + b"fine,a\n" + b",a\n" + b"   ,b\n" + b"ok \xff\xfe here,b\n"
    rows += b"x" * 60 + b",a\n" + b"no label,\n"
    path.write_bytes(rows)
    src = TextTableSource(kind="text_table", path=str(path), max_chars=50)
    with pytest.raises(DataError) as err:
        load_text_table(src)
    msg = str(err.value)
    assert f"{path}: 5 problems" in msg
    for expected in (
        "row 3: text is empty",
        "row 4: text is empty",
        "row 5: text is not valid UTF-8",
        "row 6: text has 60 characters, over max_chars 50",
        "row 7: no label",
    ):
        assert expected in msg, msg


def test_jsonl_with_non_string_texts_and_broken_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": 12, "label": "b"}\nnot json\n')
    with pytest.raises(DataError, match="line 3: not JSON"):
        load_text_table(TextTableSource(kind="text_table", path=str(path)))
    path.write_text('{"text": "fine", "label": "a"}\n{"text": 12, "label": "b"}\n')
    with pytest.raises(DataError, match=r"line 2: text is not a string \(int\)"):
        load_text_table(TextTableSource(kind="text_table", path=str(path)))
    with pytest.raises(DataError, match="no column 'body'"):
        load_text_table(TextTableSource(kind="text_table", path=str(path), text_column="body"))


def test_text_folders_per_class_or_loose(tmp_path: Path) -> None:
    for cls, texts in {"pos": ["lovely", "好"], "neg": ["awful"]}.items():
        (tmp_path / "set" / cls).mkdir(parents=True)
        for i, t in enumerate(texts):
            (tmp_path / "set" / cls / f"{i}.txt").write_text(t, encoding="utf-8")
    ds = load_text_folder(TextFolderSource(kind="text_folder", path=str(tmp_path / "set")))
    assert ds.classes == ["neg", "pos"] and sorted(ds.images) == sorted(["lovely", "好", "awful"])
    assert "pos/1.txt" in ds.ids
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.txt").write_text("some text")
    (tmp_path / "loose" / "b.txt").write_bytes(b"broken \xc3\x28")
    with pytest.raises(DataError, match=r"b.txt: not valid UTF-8 \(byte 7\)"):
        load_text_folder(TextFolderSource(kind="text_folder", path=str(tmp_path / "loose")))


def test_the_packaged_fine_food_reviews_load_offline() -> None:
    train, test = load_fine_food(FineFoodSource(kind="fine_food"))
    # 7 of the 4,000 training reviews are testing reviews too: left out of training
    assert (len(train), len(test)) == (3993, 1000)
    assert train.classes == test.classes == ["great", "other"]
    assert sum(train.class_counts().values()) == 3993 and test.class_counts()["great"] == 658
    assert not set(train.images) & set(test.images)  # no test text is ever trained on


def test_any_script_round_trips_through_the_tokenizer() -> None:
    tok = train_tokenizer(CORPUS + SCRIPTS[:2], TokenizerParams(vocab_size=400, max_len=512))
    unk = tok.token_to_id(UNK)
    for text in SCRIPTS:  # three of them never seen in training
        enc = tok.encode(text)
        assert unk not in enc.ids, text
        assert tok.decode(enc.ids) == unicodedata.normalize("NFC", text)
        assert enc.tokens[0] == "<s>" and enc.tokens[-1] == "</s>"


_TRAIN_TWICE = """
import sys
from graftline.config import TokenizerParams
from graftline.data.text import train_tokenizer
texts = [l for l in open(sys.argv[1], encoding="utf-8").read().split("\\n") if l]
print(train_tokenizer(texts, TokenizerParams(vocab_size=500, min_frequency=1)).to_str())
"""


def test_training_the_tokenizer_twice_gives_the_same_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # many pairs of equal frequency: where a hash-ordered tie-break would show
    texts = ["".join(rng.choice(list("abcdefgh"), 6)) + " 日本 😀" for _ in range(300)]
    (tmp_path / "c.txt").write_text("\n".join(texts), encoding="utf-8")
    files = {
        subprocess.run(
            [sys.executable, "-c", _TRAIN_TWICE, str(tmp_path / "c.txt")],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
            cwd=Path(__file__).resolve().parents[2],
        ).stdout
        for seed in (1, 2)
    }
    assert len(files) == 1 and json.loads(files.pop())["model"]["type"] == "BPE"


def test_long_texts_are_truncated_and_flagged() -> None:
    p = TokenizerParams(vocab_size=300, max_len=8)
    tok = train_tokenizer(CORPUS, p)
    ids, cut = encode(tok, ["short", "a much longer text than eight tokens can hold, surely"], 8, 0)
    assert ids.shape == (2, 8) and ids.dtype == np.int32
    assert cut.tolist() == [False, True]
    assert ids[0, 0] == tok.token_to_id("<s>") and (ids[0] == 0).sum() > 0  # padded
    assert ids[1, -1] == tok.token_to_id("</s>")  # truncation keeps the frame


def test_token_ids_store_with_their_tokenizer_and_texts(tmp_path: Path) -> None:
    p = TokenizerParams(vocab_size=300, max_len=16)
    tok = train_tokenizer(CORPUS, p)
    ds = load_text_table_from(tmp_path, CORPUS[:10])
    spec = token_spec(tok, p, 123)
    tokens, _ = tokenize_dataset(ds, tok, spec)
    save_splits(tmp_path / "store", {"train": tokens}, {}, texts=True)
    assert json.loads((tmp_path / "store" / TOKENIZER).read_text())["model"]["type"] == "BPE"
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["transform"]["tokenizer"] == TOKENIZER  # the JSON is the file, not inline
    back = load_split(tmp_path / "store", "train", mmap=True)
    assert back.transform == spec and back.texts == CORPUS[:10]
    assert np.array_equal(back.images, tokens.images)
    module = data_module(back)
    assert isinstance(module, TokenData)
    batch = next(iter(module.sequential(4)))
    assert set(batch.inputs) == {"input_ids", "attention_mask"}
    assert batch.inputs["input_ids"].shape[1] <= 16


def load_text_table_from(tmp_path: Path, texts: list[str]) -> Dataset:
    path = tmp_path / "t.csv"
    pd.DataFrame({"text": texts, "label": ["a", "b"] * (len(texts) // 2)}).to_csv(path, index=False)
    return load_text_table(TextTableSource(kind="text_table", path=str(path)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"pretrain": {"objective": "causal_lm", "model": {"arch": "bert"}}},
            "causal_lm needs model.arch llama",
        ),
        (
            {"pretrain": {"objective": "mlm", "model": {"arch": "llama"}}},
            "mlm needs model.arch bert",
        ),
        ({"pretrain": {"objective": "contrastive", "model": {"arch": "llama"}}}, "augments images"),
        (
            {"pretrain": {"objective": "supervised", "model": {"arch": "cnn"}}},
            "cnn cannot read texts",
        ),
        ({"finetune": {"train": {"augment": {"shift": 0.1}}}}, "image augmentations do not apply"),
        (
            {"distill": {"enabled": True, "consistency": {"epochs": 3}}},
            "text has no such augmentation",
        ),
    ],
)
def test_text_configs_that_cannot_work_fail_naming_why(change: dict, message: str) -> None:
    from graftline.config import ConfigError

    base = {
        "preprocess": {
            "pretrain": {"source": {"kind": "fine_food", "labels": "ignore"}},
            "task": {"source": {"kind": "fine_food"}},
        },
        "pretrain": {"objective": "causal_lm", "model": {"arch": "llama"}},
    }
    merged = {**base, **change}
    if "pretrain" in change:
        merged["pretrain"] = {**base["pretrain"], **change["pretrain"]}
    with pytest.raises(ConfigError, match=message):
        parse_params(merged)
    parse_params(base)  # the base itself is fine


def test_image_and_text_sources_cannot_be_mixed() -> None:
    from graftline.config import ConfigError

    with pytest.raises(ConfigError, match="both be images or both be texts"):
        parse_params({"preprocess": {"pretrain": {"source": {"kind": "fine_food"}}}})
