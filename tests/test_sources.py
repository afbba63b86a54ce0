"""Data sources: `NAME:LOCATION` picks a registered source, anything else is a class folder.

The third-party source here is a real distribution on `sys.path` (the `plugin_site` fixture),
found through its entry-point metadata as a pip-installed package would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from images import colour_folder

from tlreg.data.folder import folder
from tlreg.data.sources import DataSplit, Sample, open_source, resolve
from tlreg.errors import PluginError, UnknownNameError, UsageError

SOURCES = "tlreg.datasets"

# A source reading `path,label` lines from LOCATION/train.csv and LOCATION/val.csv.
MANIFEST_SOURCE = '''
from pathlib import Path

from tlreg.data.sources import DataSplit, Sample
from tlreg.errors import UsageError


def manifest(location, val_split, seed):
    root = Path(location)
    if val_split is not None:
        raise UsageError(f"{root} has train.csv and val.csv; drop --val-split")
    rows = {split: [line.split(",") for line in (root / f"{split}.csv").read_text().splitlines()]
            for split in ("train", "val")}
    classes = tuple(sorted({label for split in rows.values() for _, label in split}))
    index = {c: i for i, c in enumerate(classes)}
    train, val = ([Sample(str(root / path), index[label]) for path, label in rows[split]]
                  for split in ("train", "val"))
    return DataSplit(classes, tuple(train), tuple(val))


def not_a_split(location, val_split, seed):
    return [location]
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("sources") / "data", per_class=4,
                         val_per_class=2, size=16)


def _manifest_dir(data: Path, root: Path) -> Path:
    """Manifests over a subset of `data`'s images, under labels no folder is named."""
    root.mkdir()
    for split, n in (("train", 3), ("val", 1)):
        lines = [f"{p},{label}"
                 for colour, label in (("red", "warm"), ("blue", "cool"))
                 for p in sorted((data / split / colour).glob("*.png"))[:n]]
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def _manifest_site(plugin_site, name: str = "tlreg-manifest", module: str = "tlreg_manifest_mod"):
    return plugin_site.add(name, {SOURCES: {"manifest": f"{module}:manifest",
                                            "not-a-split": f"{module}:not_a_split"}},
                           {module: MANIFEST_SOURCE})


# -- the built-in folder source ----------------------------------------------------------------


def test_plain_path_and_folder_prefix_give_the_same_split(data: Path) -> None:
    plain = open_source(str(data), None, 0)
    assert plain == open_source(f"folder:{data}", None, 0) == open_source(data, None, 0)
    assert plain == folder(data) and isinstance(plain, DataSplit)
    assert plain.classes == ("blue", "red")
    assert len(plain.train) == 8 and len(plain.val) == 4
    assert all(isinstance(s, Sample) for s in plain.train + plain.val)


def test_val_split_and_seed_reach_the_source(data: Path) -> None:
    flat = data / "train"
    split = open_source(f"folder:{flat}", 0.25, 3)
    assert split == folder(flat, 0.25, 3)
    assert (len(split.train), len(split.val)) == (6, 2)


def test_folder_errors_are_unchanged(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        open_source(str(tmp_path / "missing"), None, 0)
    with pytest.raises(UsageError, match="has no train/ and val/ folders"):
        open_source(f"folder:{tmp_path}", None, 0)


def test_an_existing_path_with_a_colon_is_a_folder(data: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("photos:2024", "folder:copy"):  # even one that starts with a source name
        Path(name).symlink_to(data, target_is_directory=True)
        assert resolve(name) == ("tlreg:folder", name)
        assert open_source(name, None, 0).classes == ("blue", "red")
    absolute = tmp_path / "run:1"
    absolute.symlink_to(data, target_is_directory=True)
    assert len(open_source(str(absolute), None, 0).train) == 8


def test_a_drive_letter_is_a_folder() -> None:
    assert resolve(r"C:\data\ants") == ("tlreg:folder", r"C:\data\ants")
    with pytest.raises(UsageError, match="does not exist"):
        open_source("Z:/no/such/data", None, 0)


def test_unknown_prefix_suggests_registered_sources(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match=r"unknown data source 'fodler'.*"
                       r"did you mean 'folder'\?.*Registered sources: .*folder") as err:
        open_source(f"fodler:{tmp_path}", None, 0)
    assert err.value.exit_code == 2 and isinstance(err.value, UsageError)
    with pytest.raises(UsageError, match=r"unknown data source 'zzz' in 'zzz:x' \(not an "
                                         r"existing path either\)\. Registered sources"):
        open_source("zzz:x", None, 0)


# -- a third-party source ------------------------------------------------------------------------


def test_installed_source_is_listed_and_used(plugin_site, cli, data: Path) -> None:
    _manifest_site(plugin_site)
    code, out, err = cli("plugins", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)[SOURCES]}
    assert rows["manifest"] == {"name": "manifest", "distribution": "tlreg-manifest",
                                "version": "0.1.0", "value": "tlreg_manifest_mod:manifest"}
    assert rows["folder"]["distribution"] == "tlreg"
    code, out, _ = cli("plugins")
    assert code == 0 and "manifest" in out and "tlreg-manifest" in out

    manifests = _manifest_dir(data, data.parent / "lists")
    split = open_source(f"manifest:{manifests}", None, 0)
    assert split.classes == ("cool", "warm")
    assert (len(split.train), len(split.val)) == (6, 2)
    warm = [Path(s.path).name for s in split.train if s.label == 1]
    assert warm == ["red_000.png", "red_001.png", "red_002.png"]
    assert all(Path(s.path).is_file() for s in split.train + split.val)
    # The source's own errors reach the caller; so does a wrong return type, naming the package.
    with pytest.raises(UsageError, match="drop --val-split"):
        open_source(f"manifest:{manifests}", 0.2, 0)
    with pytest.raises(PluginError, match=r"source 'not-a-split' from package tlreg-manifest "
                                          r"0\.1\.0 returned list"):
        open_source("not-a-split:x", None, 0)


def test_colliding_sources_need_the_distribution(plugin_site, data: Path) -> None:
    _manifest_site(plugin_site)
    _manifest_site(plugin_site, name="Other_Manifest", module="other_manifest_mod")
    manifests = _manifest_dir(data, data.parent / "lists2")
    with pytest.raises(UsageError, match="'other-manifest:manifest', 'tlreg-manifest:manifest'"):
        open_source(f"manifest:{manifests}", None, 0)
    for dist in ("tlreg-manifest", "Other_Manifest"):
        assert resolve(f"{dist}:manifest:{manifests}") == (f"{dist}:manifest", str(manifests))
        assert open_source(f"{dist}:manifest:{manifests}", None, 0).classes == ("cool", "warm")


# A worked third-party source (docs/plugins.md shows it): WebDataset-style tar shards, each
# image a `KEY.png` member beside a `KEY.cls` member holding its label. Images stay in memory.
SHARDS_SOURCE = '''
import tarfile
from pathlib import Path

from tlreg.data.sources import Sample, checked_split, sort_labels


def shards(location, val_split, seed, *, train="train-*.tar", val="val-*.tar"):
    root = Path(location)
    rows = {}
    for split, pattern in (("train", train), ("val", val)):
        rows[split] = []
        for shard in sorted(root.glob(pattern)):
            with tarfile.open(shard) as tar:
                members = {m.name: m for m in tar.getmembers()}
                for name in sorted(n for n in members if n.endswith(".png")):
                    key = name.removesuffix(".png")
                    label = tar.extractfile(members[key + ".cls"]).read().decode().strip()
                    data = tar.extractfile(members[name]).read()
                    rows[split].append((f"{shard.name}/{key}", label, data))
    classes = sort_labels({label for split in rows.values() for _, label, _ in split})
    index = {c: i for i, c in enumerate(classes)}
    train, val = ([Sample(name, index[label], data=data) for name, label, data in rows[split]]
                  for split in ("train", "val"))
    return checked_split(str(root), classes, train, val, {"source": "shards", "root": str(root)})
'''


def _shard_dir(data: Path, root: Path) -> Path:
    import io
    import tarfile

    root.mkdir()
    for split in ("train", "val"):
        with tarfile.open(root / f"{split}-000.tar", "w") as tar:
            for img in sorted((data / split).rglob("*.png")):
                for suffix, payload in ((".png", img.read_bytes()),
                                        (".cls", img.parent.name.encode())):
                    info = tarfile.TarInfo(img.stem + suffix)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


def test_a_third_party_source_of_in_memory_images_trains(plugin_site, cli, data: Path,
                                                         tmp_path: Path) -> None:
    plugin_site.add("tlreg-shards", {SOURCES: {"shards": "tlreg_shards_mod:shards"}},
                    {"tlreg_shards_mod": SHARDS_SOURCE})
    shards = _shard_dir(data, tmp_path / "shards")
    split = open_source(f"shards:{shards}", None, 0)
    want = folder(data)
    assert split.classes == want.classes
    assert [s.data for s in split.train] == [Path(s.path).read_bytes() for s in want.train]
    with pytest.raises(UsageError, match=r"does not take colour \(it takes: train, val\)"):
        open_source(f"shards:{shards}", None, 0, {"colour": "red"})
    code, _, err = cli("train", f"shards:{shards}", "--out", str(tmp_path / "run"),
                         "--backbone", "timm:test_resnet", "--no-pretrained", "--img-size", "32",
                         "--workers", "0", "--cache-dir", str(tmp_path / "cache"),
                         "--source-arg", "val=val-*.tar", "-q")
    assert code == 0, err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data_source"] == {"source": "shards", "root": str(shards)}
    assert run["train_images"] == 8 and run["val_images"] == 4
