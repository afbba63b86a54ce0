"""The built-in `csv` source: tables of real photos' paths and labels (CSV, TSV, Parquet).

A table listing the same hymenoptera files as a class folder, in the folder's order, must give
the same samples, the same cached features and the same trained head (bitwise on the CPU).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from images import HYMENOPTERA, hymenoptera_subset

from tlreg.data.folder import folder
from tlreg.data.sources import open_source, resolve
from tlreg.data.table import csv as csv_source
from tlreg.errors import UsageError
from tlreg.predict import evaluate, load_model, predict

pytestmark = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="needs ../shared/data")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hymenoptera_subset(tmp_path_factory.mktemp("csv") / "photos", per_class=6,
                              val_per_class=3, size=48)


def write_table(path: Path, rows: list[dict[str, str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def manifest_rows(photos: Path, base: Path) -> list[dict[str, str]]:
    """One row per image of `photos`, in the folder source's order, paths relative to base."""
    split = folder(photos)
    rows = []
    for name, samples in (("train", split.train), ("val", split.val)):
        for s in samples:
            rows.append({"file": str(Path(s.path).relative_to(base)),
                         "species": split.classes[s.label], "split": name})
    return rows


def test_a_table_of_the_folder_s_files_is_the_folder_s_split(photos: Path) -> None:
    table = write_table(photos / "labels.csv", manifest_rows(photos, photos))
    got = open_source(str(table), None, 0, {"path_column": "file",
                                            "label_column": "species"})
    want = folder(photos)
    assert resolve(str(table)) == ("tlreg:csv", str(table))
    assert got.classes == want.classes == ("ants", "bees")
    assert got.train == want.train and got.val == want.val
    assert got.info["source"] == "csv" and got.info["rows"] == 18
    assert len(got.info["sha256"]) == 64


def test_tsv_and_parquet_read_like_csv_and_root_moves_the_base(photos: Path,
                                                                tmp_path: Path) -> None:
    rows = manifest_rows(photos, photos.parent)  # relative to the folder above photos/
    opts = {"path_column": "file", "label_column": "species", "root": str(photos.parent)}
    want = folder(photos)
    tsv = write_table(tmp_path / "labels.tsv", rows, delimiter="\t")
    assert open_source(str(tsv), None, 0, opts).train == want.train
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "labels.parquet")
    got = open_source(str(tmp_path / "labels.parquet"), None, 0, opts)
    assert got.train == want.train and got.val == want.val
    with pytest.raises(UsageError, match=r"do not exist.*pass --root"):
        open_source(str(tsv), None, 0, {k: v for k, v in opts.items() if k != "root"})


def test_val_split_test_rows_and_numeric_labels(photos: Path, tmp_path: Path) -> None:
    files = sorted(str(p) for p in (photos / "train").rglob("*.jpg"))
    rows = [{"path": f, "label": "10" if "ants" in f else "2"} for f in files]
    table = write_table(tmp_path / "t.csv", rows)
    a = csv_source(str(table), 0.25, seed=1)
    assert a.classes == ("2", "10")  # integers sort as numbers
    assert len(a.val) == 4 and len(a.train) == 8
    assert a == csv_source(str(table), 0.25, seed=1)  # the same rows on every run
    assert {s.label for s in a.val} == {0, 1}  # stratified
    marked = [dict(r, split=("test" if i % 4 == 0 else "val" if i % 4 == 1 else "train"))
              for i, r in enumerate(rows)]
    b = csv_source(str(write_table(tmp_path / "s.csv", marked)))  # `split` is found by name
    assert len(b.train) == 6 and len(b.val) == 3 and b.info["test_rows"] == 3


def test_a_missing_file_is_skipped_and_counted(photos: Path, tmp_path: Path) -> None:
    rows = manifest_rows(photos, photos)
    rows.append({"file": "train/ants/gone.jpg", "species": "ants", "split": "train"})
    table = write_table(photos / "gone.csv", rows)
    with pytest.warns(UserWarning, match="skipped 1 rows .* do not exist"):
        got = csv_source(str(table), path_column="file", label_column="species")
    assert len(got.train) == 12 and got.info["missing"] == 1


BAD = [
    ("no-column", "file,species\n{a},ants\n", {},
     r"has no column 'path' \(its columns: file, species\); name the right one with "
     r"--path-column"),
    ("empty-label", "path,label,split\n{a},,train\n{b},bees,val\n", {},
     r"line 2: .* has an empty label \('label'\)"),
    ("empty-path", "path,label,split\n,ants,train\n", {}, r"line 2: the path \('path'\) is empty"),
    ("twice", "path,label,split\n{a},ants,train\n{a},bees,val\n", {},
     r"lists .* twice \(lines 2 and 3\)"),
    ("val-only", "path,label,split\n{a},ants,train\n{b},bees,train\n{c},wasps,val\n", {},
     r"label 'wasps' appear in val but not in train"),
    ("no-split", "path,label\n{a},ants\n{b},bees\n", {},
     r"has no split column; pass --val-split 0.2"),
    ("bad-split", "path,label,split\n{a},ants,train\n{b},bees,holdout\n", {},
     r"line 3: split 'holdout' is not one of train, val"),
    ("multi", "path,label,split\n{a},ants insect,train\n{b},bees,val\n",
     {"label_delimiter": " ", "multi_label": False}, r"several labels .*drop --single-label"),
    ("most-missing", "path,label,split\nx.jpg,ants,train\ny.jpg,bees,val\n{a},ants,train\n", {},
     r"2 of the 3 files listed .* do not exist"),
    ("ragged", "path,label,split\n{a},ants\n", {}, r"line 2: 2 values for 3 columns"),
    ("empty", "", {}, r"is empty: expected a header row"),
]


@pytest.mark.parametrize(("name", "text", "opts", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_tables_are_one_clear_error(photos: Path, tmp_path: Path, name: str, text: str,
                                        opts: dict[str, str], message: str) -> None:
    files = sorted(str(p) for p in (photos / "train").rglob("*.jpg"))
    table = tmp_path / f"{name}.csv"
    table.write_text(text.format(a=files[0], b=files[-1], c=files[1]))
    with pytest.raises(UsageError, match=message) as err:
        csv_source(str(table), None, 0, **opts)
    assert err.value.exit_code == 2


def test_not_utf8_and_options_a_source_lacks(photos: Path, tmp_path: Path) -> None:
    table = tmp_path / "latin1.csv"
    table.write_bytes("path,label\ncaf\xe9.jpg,ants\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"is not UTF-8 \(byte 14 is 0xe9\); save it as UTF-8"):
        csv_source(str(table), 0.2)
    with pytest.raises(UsageError, match=r"data source 'folder' does not take path_column "
                                         r"\(it takes: no options\)"):
        open_source(str(photos), None, 0, {"path_column": "file"})
    with pytest.raises(UsageError, match=r"does not take colour \(it takes: path_column, "):
        open_source(str(table), 0.2, 0, {"colour": "red"})


def _train(data: str, out: Path, cache: Path, **source_args: str) -> dict:
    from tlreg.engine.config import TrainConfig
    from tlreg.engine.trainer import fit

    cfg = TrainConfig(data=data, out=str(out), backbone="timm:test_resnet", pretrained=False,
                      img_size=32, device="cpu", workers=0, quiet=True, cache_dir=str(cache),
                      source_args=source_args)
    return fit(cfg).summary


def test_training_on_a_table_equals_training_on_the_folder(photos: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    table = write_table(photos / "manifest.csv", manifest_rows(photos, photos))
    cache = tmp_path / "cache"
    _train(str(photos), tmp_path / "by-folder", cache)
    from tlreg.data.features import chunk_entries

    chunks = sorted((cache / "features").glob("*/chunk-*.safetensors"))
    assert len({c.parent for c in chunks}) == 1
    _train(str(table), tmp_path / "by-table", cache, path_column="file",
           label_column="species")
    assert sorted((cache / "features").glob("*/chunk-*.safetensors")) == chunks  # reused
    index = chunk_entries(chunks[0].parent)
    assert len(index) == 18 and all(Path(k).is_file() for k in index)
    from tlreg._io import read_checkpoint

    heads = [read_checkpoint(tmp_path / run / "checkpoints" / "best")[0]
             for run in ("by-folder", "by-table")]
    assert heads[0].keys() == heads[1].keys()
    for k in heads[0]:
        assert torch.equal(heads[0][k], heads[1][k]), k
    run = json.loads((tmp_path / "by-table" / "run.json").read_text())
    assert run["data_source"]["source"] == "csv" and run["classes"] == ["ants", "bees"]
    # eval scores the table's val rows, as it scores the folder's val/ images
    model = load_model(str(tmp_path / "by-table"))
    by_table = evaluate(model, str(table), source_args={"path_column": "file",
                                                        "label_column": "species"})
    assert by_table["images"] == 6
    assert by_table["accuracy"] == evaluate(model, str(photos / "val"))["accuracy"]
    # predict labels the files a table lists, as it labels the files themselves
    listed = predict(model, [str(table)], path_column="file")
    files = [str(photos / r["file"]) for r in manifest_rows(photos, photos)]
    assert [r["file"] for r in listed] == files
    assert listed == predict(model, files)
    with pytest.raises(UsageError, match=r"has no column 'path' \(its columns: file, species, "):
        predict(model, [str(table)])


def test_cli_bad_table_exits_2_and_writes_nothing(photos: Path, tmp_path: Path, cli) -> None:
    table = tmp_path / "bad.csv"
    table.write_text("file,species\nx.jpg,ants\n")
    before = table.read_bytes()
    code, out, err = cli("train", str(table), "--out", str(tmp_path / "run"),
                         "--backbone", "timm:test_resnet", "--no-pretrained")
    assert code == 2
    assert "has no column 'path' (its columns: file, species)" in err
    assert not (tmp_path / "run").exists() and table.read_bytes() == before
    code, out, _ = cli("sources", "list", "--json")
    assert code == 0 and {r["name"] for r in json.loads(out)} >= {"csv", "folder", "hf"}


def test_resume_on_a_table_gone_bad_touches_nothing(photos: Path, tmp_path: Path, cli) -> None:
    table = write_table(photos / "resume.csv", manifest_rows(photos, photos))
    run = tmp_path / "run"
    code, _, err = cli("train", str(table), "--out", str(run), "--path-column", "file",
                       "--label-column", "species", "--backbone", "timm:test_resnet",
                       "--no-pretrained", "--img-size", "32", "--workers", "0", "--epochs", "2",
                       "--cache-dir", str(tmp_path / "cache"), "-q")
    assert code == 0, err
    saved = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    table.write_text(table.read_text().replace(",bees,", ",,", 1))  # an empty label
    code, _, err = cli("train", "--resume", str(run))
    assert code == 2 and "has an empty label ('species')" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == saved
