"""The real ``huggingface_hub`` client, unpatched, against ``LocalHub`` over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hub_server import TEST_TOKEN, TEST_USER, LocalHub, git_blob_sha1, running_hub, sha256_hex
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import get_hf_file_metadata
from safetensors.numpy import load_file, save

REPO = f"{TEST_USER}/demo"
README = b"---\nlicense: mit\n---\n# Demo\n"
CONFIG_V1 = json.dumps({"num_classes": 2}).encode()
CONFIG_V2 = json.dumps({"num_classes": 3}).encode()
WEIGHTS = save({"head.weight": np.arange(6, dtype=np.float32).reshape(2, 3)})


@pytest.fixture
def hub(hf_env: Path) -> Iterator[LocalHub]:
    with running_hub(tokens={TEST_TOKEN: TEST_USER, "hf_bob_token": "bob"}) as hub:
        yield hub
        assert hub.errors == []


@pytest.fixture
def api(hub: LocalHub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TEST_TOKEN)


def _model_folder(root: Path, config: bytes = CONFIG_V1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_bytes(README)
    (root / "model.safetensors").write_bytes(WEIGHTS)
    (root / "config.json").write_bytes(config)
    return root


def _commit_posts(hub: LocalHub) -> list[tuple[str, str]]:
    return [(m, p) for m, p in hub.log if m == "POST" and "/commit/" in p]


def test_upload_folder_then_download(hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    url = api.create_repo(REPO)
    assert (url.repo_id, url.endpoint, str(url)) == (REPO, hub.endpoint, f"{hub.endpoint}/{REPO}")

    info = api.upload_folder(
        repo_id=REPO, folder_path=_model_folder(tmp_path / "v1"), commit_message="v1"
    )
    assert info.oid == hub.head(REPO)
    assert len(_commit_posts(hub)) == 1
    files = hub.files(REPO)
    assert set(files) == {".gitattributes", "README.md", "model.safetensors", "config.json"}
    assert (files["README.md"], files["model.safetensors"]) == (README, WEIGHTS)

    model = api.model_info(REPO)
    assert (model.id, model.sha, model.private) == (REPO, info.oid, False)
    assert {s.rfilename for s in model.siblings or []} == set(files)

    path = hf_hub_download(REPO, "model.safetensors", endpoint=hub.endpoint)
    assert Path(path).read_bytes() == WEIGHTS
    assert load_file(path)["head.weight"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert hub.downloads() == [f"/{REPO}/resolve/main/model.safetensors"]

    # A second call revalidates with HEAD only: the blob comes from the cache.
    assert hf_hub_download(REPO, "model.safetensors", endpoint=hub.endpoint) == path
    assert len(hub.downloads()) == 1
    assert hub.log[-1] == ("HEAD", f"/{REPO}/resolve/main/model.safetensors")

    weights = get_hf_file_metadata(hf_hub_url(REPO, "model.safetensors", endpoint=hub.endpoint))
    assert (weights.etag, weights.size, weights.commit_hash) == (
        sha256_hex(WEIGHTS),
        len(WEIGHTS),
        info.oid,
    )
    config = get_hf_file_metadata(hf_hub_url(REPO, "config.json", endpoint=hub.endpoint))
    assert config.etag == git_blob_sha1(CONFIG_V1)


def test_second_upload_adds_a_commit_and_keeps_history(
    hub: LocalHub, api: HfApi, tmp_path: Path
) -> None:
    api.create_repo(REPO)
    v1 = api.upload_folder(
        repo_id=REPO, folder_path=_model_folder(tmp_path / "v1"), commit_message="v1"
    )
    folder = _model_folder(tmp_path / "v2", config=CONFIG_V2)
    (folder / "labels.txt").write_text("ant\nbee\n")
    v2 = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="v2")

    assert v1.oid != v2.oid
    assert len(_commit_posts(hub)) == 2
    commits = api.list_repo_commits(REPO)
    assert [c.title for c in commits] == ["v2", "v1", "initial commit"]
    assert [c.commit_id for c in commits[:2]] == [v2.oid, v1.oid]
    tree = {e.path: e for e in api.list_repo_tree(REPO, expand=True)}
    assert tree["README.md"].last_commit.oid == v1.oid  # unchanged since v1
    assert tree["config.json"].last_commit.oid == v2.oid

    latest = Path(snapshot_download(REPO, endpoint=hub.endpoint))
    assert latest.name == v2.oid
    assert (latest / "config.json").read_bytes() == CONFIG_V2
    assert (latest / "labels.txt").read_text() == "ant\nbee\n"

    old = Path(snapshot_download(REPO, revision=v1.oid, endpoint=hub.endpoint))
    assert old.name == v1.oid
    assert (old / "config.json").read_bytes() == CONFIG_V1
    assert (old / "model.safetensors").read_bytes() == WEIGHTS
    assert not (old / "labels.txt").exists()
    assert f"/{REPO}/resolve/{v1.oid}/config.json" in hub.downloads()
    assert f"/{REPO}/resolve/{v2.oid}/labels.txt" in hub.downloads()


def test_private_repo_needs_a_valid_token(hub: LocalHub, api: HfApi) -> None:
    api.create_repo(REPO, private=True)
    api.upload_file(repo_id=REPO, path_or_fileobj=CONFIG_V1, path_in_repo="config.json")

    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "config.json", endpoint=hub.endpoint, token=False)

    for call in (
        lambda: HfApi(endpoint=hub.endpoint, token="hf_wrong").model_info(REPO),
        lambda: hf_hub_download(REPO, "config.json", endpoint=hub.endpoint, token="hf_wrong"),
        lambda: snapshot_download(REPO, endpoint=hub.endpoint, token="hf_wrong"),
    ):
        with pytest.raises(HfHubHTTPError) as caught:
            call()
        assert caught.value.response.status_code == 401
        assert not isinstance(caught.value, RepositoryNotFoundError)
        assert "Invalid credentials" in str(caught.value)

    assert api.model_info(REPO).private is True
    path = hf_hub_download(REPO, "config.json", endpoint=hub.endpoint, token="hf_bob_token")
    assert Path(path).read_bytes() == CONFIG_V1


def test_missing_repo_revision_and_file_raise_typed_errors(hub: LocalHub, api: HfApi) -> None:
    hub.create_repo(REPO)
    hub.put_file(REPO, "config.json", CONFIG_V1)
    endpoint = hub.endpoint

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{TEST_USER}/nope", "config.json", endpoint=endpoint)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(f"{TEST_USER}/nope", endpoint=endpoint)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{TEST_USER}/nope")

    for revision in ("no-such-branch", "0" * 40):
        with pytest.raises(RevisionNotFoundError):
            hf_hub_download(REPO, "config.json", revision=revision, endpoint=endpoint)
        with pytest.raises(RevisionNotFoundError):
            snapshot_download(REPO, revision=revision, endpoint=endpoint)

    with pytest.raises(EntryNotFoundError) as caught:
        hf_hub_download(REPO, "missing.bin", endpoint=endpoint)
    assert isinstance(caught.value, RemoteEntryNotFoundError)
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="no/such/dir"))
    assert hub.downloads() == []


def test_planted_files_branches_and_listings(hub: LocalHub, api: HfApi) -> None:
    hub.create_repo(REPO)
    hub.put_file(REPO, "weights/evil.pkl", b"\x80\x04cos\nsystem\n.")
    dev = hub.put_file(REPO, "weights/model.safetensors", WEIGHTS, branch="dev")

    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "weights/evil.pkl"]
    top = api.list_repo_tree(REPO, revision="dev")
    assert sorted((type(e).__name__, e.path) for e in top) == [
        ("RepoFile", ".gitattributes"),
        ("RepoFolder", "weights"),
    ]
    nested = {e.path: e for e in api.list_repo_tree(REPO, "weights", revision="dev")}
    lfs = nested["weights/model.safetensors"].lfs
    assert lfs is not None and (lfs.sha256, lfs.size) == (sha256_hex(WEIGHTS), len(WEIGHTS))
    assert api.file_exists(REPO, "weights/evil.pkl")
    assert not api.file_exists(REPO, "weights/model.safetensors")  # only on dev

    path = hf_hub_download(
        REPO, "model.safetensors", subfolder="weights", revision="dev", endpoint=hub.endpoint
    )
    assert Path(path).read_bytes() == WEIGHTS
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches}["dev"] == dev


def test_commit_operations_pr_and_write_errors(hub: LocalHub, api: HfApi) -> None:
    api.create_repo(REPO)
    first = api.create_commit(
        REPO,
        [
            CommitOperationAdd("model.safetensors", WEIGHTS),
            CommitOperationAdd("notes/a.txt", b"a"),
            CommitOperationAdd("notes/b.txt", b"b"),
        ],
        commit_message="add",
    )
    # Server-side copies: the LFS-described file goes by sha256, the regular one by content.
    api.create_commit(
        REPO,
        [
            CommitOperationCopy("model.safetensors", "backup/model.safetensors"),
            CommitOperationCopy("notes/a.txt", "backup/a.txt"),
            CommitOperationDelete("notes/"),
        ],
        commit_message="copy and delete",
    )
    files = hub.files(REPO)
    assert files["backup/model.safetensors"] == WEIGHTS
    assert files["backup/a.txt"] == b"a"
    assert not any(p.startswith("notes/") for p in files)

    with pytest.raises(HfHubHTTPError) as caught:  # main moved on since `first`
        api.upload_file(
            repo_id=REPO, path_or_fileobj=b"x", path_in_repo="x.txt", parent_commit=first.oid
        )
    assert caught.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.delete_file("never-there.txt", REPO)

    pr = api.upload_file(repo_id=REPO, path_or_fileobj=b"pr", path_in_repo="pr.txt", create_pr=True)
    assert (pr.pr_num, pr.pr_revision) == (1, "refs/pr/1")
    assert "pr.txt" not in hub.files(REPO)
    assert hub.files(REPO, "refs/pr/1")["pr.txt"] == b"pr"

    api.create_branch(REPO, branch="release")
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_branch(REPO, branch="release")
    assert caught.value.response.status_code == 409
    api.create_branch(REPO, branch="release", exist_ok=True)

    with pytest.raises(HfHubHTTPError) as caught:
        api.create_repo(REPO)
    assert caught.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO

    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(HfHubHTTPError) as caught:
        anonymous.upload_file(repo_id=REPO, path_or_fileobj=b"x", path_in_repo="x.txt")
    assert caught.value.response.status_code == 401
    assert api.whoami()["name"] == TEST_USER


def test_dataset_repo_and_range_requests(hub: LocalHub, api: HfApi) -> None:
    repo_id = f"{TEST_USER}/images"
    api.create_repo(repo_id, repo_type="dataset")
    api.upload_file(
        repo_id=repo_id, repo_type="dataset", path_or_fileobj=b"0123456789", path_in_repo="d.bin"
    )
    path = hf_hub_download(repo_id, "d.bin", repo_type="dataset", endpoint=hub.endpoint)
    assert Path(path).read_bytes() == b"0123456789"
    assert hub.downloads() == [f"/datasets/{repo_id}/resolve/main/d.bin"]
    assert api.dataset_info(repo_id).sha == hub.head(repo_id, repo_type="dataset")

    url = f"{hub.endpoint}/datasets/{repo_id}/resolve/main/d.bin"
    request = urllib.request.Request(url, headers={"Range": "bytes=4-"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == "bytes 4-9/10"
        assert response.read() == b"456789"
