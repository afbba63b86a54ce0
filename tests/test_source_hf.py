"""The `hf` source: Hugging Face `datasets` on disk, in Parquet, and on a Hub (the local test
server, with the real `datasets` and `huggingface_hub` clients, neither patched).

Every data set here is written with `datasets` from the same real photos as a class folder, so
training on it must give the folder's trained head, bitwise on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_server import TEST_TOKEN, TEST_USER, LocalHub
from images import HYMENOPTERA, hymenoptera_subset

from tlreg._io import read_checkpoint
from tlreg.data.folder import folder
from tlreg.data.sources import identity, open_source
from tlreg.errors import HubAuthError, HubConnectionError, HubNotFoundError, UsageError

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="needs ../shared/data")
REPO = "tlreg-test/hymenoptera"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hymenoptera_subset(tmp_path_factory.mktemp("hf") / "photos", per_class=6,
                              val_per_class=3, size=48)


def as_dataset_dict(photos: Path):
    """train / validation splits of the folder's images, their bytes held in Arrow."""
    split = folder(photos)
    features = datasets.Features({"img": datasets.Image(),
                                  "species": datasets.ClassLabel(names=list(split.classes))})

    def rows(samples):
        images = [{"bytes": Path(s.path).read_bytes(), "path": None} for s in samples]
        return datasets.Dataset.from_dict({"img": images, "species": [s.label for s in samples]},
                                          features=features)

    return datasets.DatasetDict({"train": rows(split.train), "validation": rows(split.val)})


def _train(data: str, out: Path, cache: Path) -> None:
    from tlreg.engine.config import TrainConfig
    from tlreg.engine.trainer import fit

    fit(TrainConfig(data=data, out=str(out), backbone="timm:test_resnet", pretrained=False,
                    img_size=32, device="cpu", workers=0, quiet=True, cache_dir=str(cache)))


def _head(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run / "checkpoints" / "best")[0]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_disk_parquet_and_memory_give_the_folder_s_images(photos: Path, tmp_path: Path) -> None:
    want = folder(photos)
    as_dataset_dict(photos).save_to_disk(str(tmp_path / "saved"))
    saved = open_source(f"hf:{tmp_path / 'saved'}", None, 0)
    assert saved.classes == want.classes
    assert [s.label for s in saved.train] == [s.label for s in want.train]
    # Arrow rows carry the files' bytes: the same images, keyed by their content hash
    assert [s.data for s in saved.train] == [Path(s.path).read_bytes() for s in want.train]
    assert all(identity(s)[0].startswith("sha256:") for s in saved.train + saved.val)
    assert saved.info | {"dataset": "x"} == {"source": "hf", "dataset": "x", "image_column": "img",
                                              "label_column": "species",
                                              "splits": {"train": "train", "val": "validation"}}
    parquet = tmp_path / "parquet"
    for name, ds in as_dataset_dict(photos).items():
        ds.to_parquet(str(parquet / "data" / f"{name}-00000-of-00001.parquet"))
    from_parquet = open_source(f"hf:{parquet}", None, 0)
    assert [identity(s) for s in from_parquet.train] == [identity(s) for s in saved.train]
    one_file = open_source(f"hf:{parquet / 'data' / 'train-00000-of-00001.parquet'}", 0.25, 3)
    assert len(one_file.train) + len(one_file.val) == 12 and one_file.val
    # rows that reference files (datasets' imagefolder) are file samples, keyed like the folder's
    by_path = open_source(f"hf:{photos}", None, 0)
    assert by_path.classes == want.classes
    assert sorted(by_path.train, key=lambda s: s.path) == list(want.train)
    assert sorted(by_path.val, key=lambda s: s.path) == list(want.val)


def test_training_on_arrow_bytes_equals_training_on_files(photos: Path, tmp_path: Path) -> None:
    as_dataset_dict(photos).save_to_disk(str(tmp_path / "saved"))
    cache = tmp_path / "cache"
    _train(str(photos), tmp_path / "by-folder", cache)
    _train(f"hf:{tmp_path / 'saved'}", tmp_path / "by-hf", cache)
    _same(_head(tmp_path / "by-folder"), _head(tmp_path / "by-hf"))
    from tlreg.data.features import chunk_entries

    entry = next((cache / "features").glob("*/chunk-*.safetensors")).parent
    keys = set(chunk_entries(entry))
    assert sum(k.startswith("sha256:") for k in keys) == 18  # one per image, beside the files'
    chunks = sorted(entry.glob("chunk-*"))
    _train(f"hf:{tmp_path / 'saved'}", tmp_path / "again", cache)  # same keys: nothing new
    assert set(chunk_entries(entry)) == keys and sorted(entry.glob("chunk-*")) == chunks
    run = json.loads((tmp_path / "by-hf" / "run.json").read_text())
    assert run["data_source"]["splits"] == {"train": "train", "val": "validation"}


def test_bad_data_sets_are_one_clear_error(photos: Path, tmp_path: Path) -> None:
    dd = as_dataset_dict(photos)
    dd["train"].save_to_disk(str(tmp_path / "one"))  # a Dataset: train only
    with pytest.raises(UsageError, match=r"has no validation split \(its splits: train\); pass "
                                         r"--val-split 0.2"):
        open_source(f"hf:{tmp_path / 'one'}", None, 0)
    no_image = dd.cast_column("img", datasets.Image(decode=False)).map(
        lambda r: {"blob": r["img"]["bytes"]}, remove_columns=["img"])
    no_image.save_to_disk(str(tmp_path / "blobs"))
    with pytest.raises(UsageError, match=r"has no image column \(its columns: species "
                                         r"\(ClassLabel\), blob \(Value\)\); name the column"):
        open_source(f"hf:{tmp_path / 'blobs'}", None, 0)
    # bytes in a plain binary column are images once named
    named = open_source(f"hf:{tmp_path / 'blobs'}", None, 0, {"image_column": "blob"})
    assert len(named.train) == 12
    with pytest.raises(UsageError, match=r"no column 'label' \(its columns: "):
        open_source(f"hf:{tmp_path / 'blobs'}", None, 0, {"image_column": "blob",
                                                          "label_column": "label"})
    with pytest.raises(UsageError, match=r"has a validation split \('validation'\); drop"):
        open_source(f"hf:{tmp_path / 'blobs'}", 0.2, 0, {"image_column": "blob"})
    unlabelled = dd["validation"].cast_column("species", datasets.Value("int64")).map(
        lambda r: {"species": -1}).cast_column("species", dd["train"].features["species"])
    datasets.DatasetDict({"train": dd["train"], "validation": unlabelled}).save_to_disk(
        str(tmp_path / "unlabelled"))
    with pytest.raises(UsageError, match=r"/validation row 0 has no label \('species' is -1\)"):
        open_source(f"hf:{tmp_path / 'unlabelled'}", None, 0)
    with pytest.raises(UsageError, match="`datasets` cannot read it"):
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "notes.bin").write_bytes(b"\0\1")
        open_source(f"hf:{tmp_path / 'junk'}", None, 0)


# -- a Hub data set, through the local Hub-compatible server -------------------------------------


@pytest.fixture
def hub(hf_env: Path, monkeypatch: pytest.MonkeyPatch, photos: Path,
        tmp_path: Path) -> Iterator[LocalHub]:
    from huggingface_hub import constants

    with LocalHub() as local:
        monkeypatch.setattr(constants, "ENDPOINT", local.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            local.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
        for repo, private in ((REPO, False), (REPO + "-private", True), (REPO + "-gated", False),
                              (REPO + "-granted", False)):
            local.create_repo(repo, private, repo_type="dataset", gated="-g" in repo,
                              granted=(TEST_USER,) if repo.endswith("granted") else ())
            for name, ds in as_dataset_dict(photos).items():
                ds.to_parquet(str(tmp_path / f"{name}.parquet"))
                local.put_file(repo, f"data/{name}-00000-of-00001.parquet",
                               (tmp_path / f"{name}.parquet").read_bytes(), repo_type="dataset")
        yield local
        assert local.errors == []


def test_a_hub_data_set_is_pinned_to_its_commit(hub: LocalHub, photos: Path,
                                                tmp_path: Path) -> None:
    split = open_source(f"hf:{REPO}", None, 0)
    head = hub.head(REPO, repo_type="dataset")
    assert split.info["revision"] == head and split.info["dataset"] == REPO
    assert [s.data for s in split.val] == [Path(s.path).read_bytes() for s in folder(photos).val]
    first = hub.commits(REPO, repo_type="dataset")[-1].oid  # before any data: no train split
    with pytest.raises(UsageError, match=f"hf:{REPO}@{first} \\(commit {first[:12]}\\): "
                                         "`datasets` cannot read it: EmptyDatasetError"):
        open_source(f"hf:{REPO}@{first}", None, 0)
    with pytest.raises(HubNotFoundError, match=f"revision 'nope' not found in {REPO}"):
        open_source(f"hf:{REPO}@nope", None, 0)
    # anonymous callers get 401 for private and missing repos alike, as on the Hub
    with pytest.raises(HubNotFoundError, match=f"repository {REPO}-private not found .*if it is "
                                               "private, use a token"):
        open_source(f"hf:{REPO}-private", None, 0)


def test_a_gated_hub_data_set_needs_access(hub: LocalHub, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    with pytest.raises(HubAuthError, match=f"{REPO}-gated on .* is gated: request access"):
        open_source(f"hf:{REPO}-gated", None, 0)
    assert len(open_source(f"hf:{REPO}-granted", None, 0).train) == 12  # access granted


def test_hub_token_and_offline_cache(hub: LocalHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    private = open_source(f"hf:{REPO}-private", None, 0)
    assert len(private.train) == 12
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    again = open_source(f"hf:{REPO}-private", None, 0)
    assert again.train == private.train and again.info["revision"] == private.info["revision"]
    with pytest.raises(HubConnectionError, match=rf"{REPO}@main is not cached"):
        open_source(f"hf:{REPO}", None, 0)  # never downloaded
