"""Push / pull / inspect through the real `huggingface_hub` client against LocalHub over HTTP.

The `hub` fixture (from test_artifact.py) makes a LocalHub the default endpoint for the test,
exactly as `HF_ENDPOINT` would, so the CLI is exercised unmodified.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import pytest
import test_artifact
import torch
from hub_server import TEST_TOKEN, TEST_USER, LocalHub
from huggingface_hub import hf_hub_download
from safetensors.torch import save
from test_artifact import (
    BACKBONE,
    TIMM_REPO,
    _pickle_bomb,
    images,
    logits,
    make_run,
    nudge_head,
    pretrained_model,
    served_backbone_sha256,
    timm_weights,
    train_step,
)

import tlreg.cli
from tlreg.errors import (
    ChecksumError,
    FormatVersionError,
    HubConnectionError,
    HubNotFoundError,
    UnsafeFileError,
    UnsafeUploadError,
)
from tlreg.hubclient import hub_errors
from tlreg.models.transfer import create_model
from tlreg.sharing.api import inspect, load_artifact, push_model, push_run
from tlreg.sharing.format import BACKBONE_FILE, CONFIG_FILE, HEAD_FILE
from tlreg.sharing.hub import pull
from tlreg.sharing.save import save_artifact

hub = test_artifact.hub  # the shared fixture: a LocalHub as the Hub (hf_env is in conftest)

REPO = f"{TEST_USER}/ants-vs-bees"
BAD_TOKEN = "hf_this_token_is_wrong_0123456789"


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
        ) -> tuple[int, str, str]:
    """Run `tlreg ARGS` in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        tlreg.cli.main(list(args))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def commits(local: LocalHub) -> list[str]:
    return [p for m, p in local.log if m == "POST" and "/commit/" in p]


def artifact_files(local: LocalHub, revision: str = "main") -> set[str]:
    return set(local.files(REPO, revision)) - {".gitattributes"}


@pytest.fixture
def model() -> object:
    m = pretrained_model()
    nudge_head(m)
    return m


# -- push and pull ------------------------------------------------------------------------------


def test_push_then_pull_gives_the_same_model(hub: LocalHub, model, tmp_path: Path) -> None:
    url = push_model(model, REPO)
    oid = hub.head(REPO)
    assert url.endswith(f"/{REPO}/commit/{oid}")
    assert len(commits(hub)) == 1  # one commit holds every file
    assert artifact_files(hub) == {CONFIG_FILE, HEAD_FILE, "README.md"}
    readme = hub.files(REPO)["README.md"].decode()
    assert f'from_pretrained("{REPO}")' in readme and "<REPO_ID>" not in readme

    hub.clear_log()
    folder = pull(REPO)
    assert folder.is_relative_to(hub_cache()) and folder.name == oid
    assert any(p.endswith(f"/resolve/{oid}/{HEAD_FILE}") for p in hub.downloads())
    loaded = load_artifact(REPO)
    x = images()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-6, rtol=0)
    assert loaded.info.label_names == ("c0", "c1")


def test_the_familiarity_bank_travels_with_push_and_pull(hub: LocalHub, model,
                                                         tmp_path: Path) -> None:
    from tlreg.engine import familiarity

    g = torch.Generator().manual_seed(0)
    dim = model.feature_dim
    model.familiarity = familiarity.build(torch.randn(40, dim, generator=g),
                                          torch.arange(40) % 2, torch.randn(10, dim, generator=g))
    push_model(model, REPO)
    assert artifact_files(hub) == {CONFIG_FILE, HEAD_FILE, "README.md",
                                   "familiarity.safetensors"}
    loaded = load_artifact(REPO)
    assert loaded.familiarity is not None
    for name, tensor in model.familiarity.items():
        assert torch.equal(loaded.familiarity[name], tensor)


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def test_a_second_push_updates_and_pull_by_commit_gets_the_old_one(hub: LocalHub,
                                                                  tmp_path: Path) -> None:
    finetuned = pretrained_model(policy="finetune")
    train_step(finetuned)
    push_model(finetuned, REPO, message="first")
    first = hub.head(REPO)
    assert BACKBONE_FILE in artifact_files(hub)

    probe = pretrained_model()
    nudge_head(probe, seed=3)
    push_model(probe, REPO)
    second = hub.head(REPO)
    assert [c.title for c in hub.commits(REPO)][:2] == [
        "Upload tlreg artifact (timm:test_resnet, linear head, 2 classes)", "first"]
    assert artifact_files(hub) == {CONFIG_FILE, HEAD_FILE, "README.md"}  # stale delta deleted

    x = images()
    old = load_artifact(f"{REPO}@{first}")
    torch.testing.assert_close(logits(old, x), logits(finetuned, x), atol=1e-6, rtol=0)
    new = load_artifact(REPO)
    torch.testing.assert_close(logits(new, x), logits(probe, x), atol=1e-6, rtol=0)
    assert pull(REPO, revision=first).name == first and pull(REPO).name == second


def test_push_to_a_branch_and_pull_it(hub: LocalHub, model, tmp_path: Path) -> None:
    push_model(model, REPO, revision="experiment")
    assert artifact_files(hub, "experiment") == {CONFIG_FILE, HEAD_FILE, "README.md"}
    assert artifact_files(hub, "main") == set()
    out = pull(f"{REPO}@experiment", dir=tmp_path / "copy")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", CONFIG_FILE, HEAD_FILE]
    assert not any(p.is_symlink() for p in out.iterdir())


def test_cli_export_push_pull_inspect(hub: LocalHub, model, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run = make_run(tmp_path / "run", model, pretrained_sha256=served_backbone_sha256(0))
    code, out, err = run_cli(monkeypatch, capsys, "export", str(run), str(tmp_path / "art"))
    assert code == 0, err
    assert "wrote" in out and (tmp_path / "art" / HEAD_FILE).is_file()

    code, out, err = run_cli(monkeypatch, capsys, "push", str(run), REPO, "--message", "v1")
    assert code == 0, err
    assert f"pushed {REPO}@main: " in out and hub.head(REPO) in out
    blobs = b"".join(hub.files(REPO).values())
    assert str(tmp_path).encode() not in blobs and b"secret_data" not in blobs
    assert TEST_TOKEN.encode() not in blobs

    hub.clear_log()
    code, out, err = run_cli(monkeypatch, capsys, "inspect", REPO, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["commit"] == hub.head(REPO) and report["kind"] == "hub"
    assert report["card"]["library_name"] == "tlreg"
    assert report["card"]["base_model"] == TIMM_REPO
    assert report["config"]["metrics"]["val_accuracy"] == 0.875
    rows = {f["name"]: f for f in report["files"]}
    assert rows[HEAD_FILE]["status"] == "ok" and rows["training.png"]["status"] == "ok"
    assert not any(p.endswith(HEAD_FILE) for p in hub.downloads())  # no weights downloaded

    code, out, err = run_cli(monkeypatch, capsys, "inspect", REPO)
    assert code == 0, err
    assert "format version 1" in out and "head.safetensors" in out and "ok" in out

    code, out, err = run_cli(monkeypatch, capsys, "pull", REPO, "--dir", str(tmp_path / "pulled"))
    assert code == 0, err
    assert out.strip() == str(tmp_path / "pulled")
    loaded = load_artifact(tmp_path / "pulled")
    x = images()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-6, rtol=0)


def test_push_run_pushes_the_chosen_checkpoint(hub: LocalHub, model, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", model, pretrained_sha256=served_backbone_sha256(0))
    push_run(run, REPO, checkpoint="last")
    cfg = json.loads(hub.files(REPO)[CONFIG_FILE])
    assert cfg["metrics"] == {"epoch": 2.0, "val_accuracy": 0.75, "val_loss": 0.5}
    assert "training.png" in hub.files(REPO)


# -- safety -------------------------------------------------------------------------------------


def test_a_repo_holding_a_pickle_is_refused_before_any_download(hub: LocalHub, model,
                                                                tmp_path: Path,
                                                                monkeypatch, capsys) -> None:
    push_model(model, REPO)
    marker = tmp_path / "pwned"
    hub.put_file(REPO, "pytorch_model.bin", _pickle_bomb(marker))
    hub.clear_log()
    code, _, err = run_cli(monkeypatch, capsys, "pull", REPO)
    assert code == 6
    assert err.startswith("error: alice/ants-vs-bees@main holds pickle files (pytorch_model.bin)")
    assert err.count("\n") == 1
    assert hub.downloads() == [] and not marker.exists()
    with pytest.raises(UnsafeFileError):
        load_artifact(REPO)


def test_a_tampered_tensor_on_the_hub_is_a_checksum_error(hub: LocalHub, model,
                                                         monkeypatch, capsys) -> None:
    push_model(model, REPO)
    head = load_file_bytes(hub.files(REPO)[HEAD_FILE])
    head["0.weight"][0, 0] += 1.0
    hub.put_file(REPO, HEAD_FILE, save(head))
    code, _, err = run_cli(monkeypatch, capsys, "pull", REPO)
    assert code == 6 and "head.safetensors" in err and "is corrupt or was modified" in err
    with pytest.raises(ChecksumError):
        load_artifact(REPO)


def load_file_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def test_a_config_from_a_future_format_version_is_refused(hub: LocalHub, model,
                                                         monkeypatch, capsys) -> None:
    push_model(model, REPO)
    cfg = json.loads(hub.files(REPO)[CONFIG_FILE])
    cfg["format_version"] = 99
    hub.put_file(REPO, CONFIG_FILE, json.dumps(cfg).encode())
    code, _, err = run_cli(monkeypatch, capsys, "pull", REPO)
    assert code == 6 and "format version 99 is newer than this tlreg supports (2)" in err
    with pytest.raises(FormatVersionError):
        load_artifact(REPO)


def test_backbone_mismatch_on_pull_and_the_override(hub: LocalHub, model,
                                                    monkeypatch, capsys) -> None:
    push_model(model, REPO)
    hub.put_file(TIMM_REPO, "model.safetensors", timm_weights(1))
    code, _, err = run_cli(monkeypatch, capsys, "pull", REPO)
    assert code == 6 and "the head was trained on weights hashing to" in err
    code, out, err = run_cli(monkeypatch, capsys, "pull", REPO, "--allow-backbone-mismatch")
    assert code == 0 and "warning:" in err and "loaded anyway" in err
    assert Path(out.strip()).name == hub.head(REPO)


def test_push_refuses_absolute_paths_and_tokens(hub: LocalHub, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_model(BACKBONE, 2, pretrained=False, head="mlp",
                         head_args={"hidden": 8, "norm": None})
    folder = save_artifact(model, tmp_path / "art")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["dataset"] = "/home/someone/private/data"
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(UnsafeUploadError, match=r"absolute local path at dataset"):
        push_model(folder, REPO)

    folder = save_artifact(model, tmp_path / "art")
    card = folder / "README.md"
    card.write_text(card.read_text() + f"\nmy token: {TEST_TOKEN}\n")
    with pytest.raises(UnsafeUploadError, match=r"README\.md contains a Hub token"):
        push_model(folder, REPO)
    assert commits(hub) == []
    assert TEST_TOKEN not in str(hub.log)


def test_push_refuses_a_corrupt_artifact(hub: LocalHub, tmp_path: Path) -> None:
    model = create_model(BACKBONE, 2, pretrained=False)
    folder = save_artifact(model, tmp_path / "art")
    (folder / HEAD_FILE).write_bytes((folder / HEAD_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ChecksumError):
        push_model(folder, REPO)
    assert commits(hub) == []


# -- failures, one clear line each ----------------------------------------------------------------


def test_private_repo_with_a_wrong_token_is_a_401(hub: LocalHub, model, tmp_path: Path,
                                                  monkeypatch, capsys) -> None:
    push_model(model, REPO, private=True)
    code, out, err = run_cli(monkeypatch, capsys, "pull", REPO, "--token", BAD_TOKEN)
    assert code == 3
    assert err.startswith(f"error: the Hub at {hub.endpoint} rejected the token (401")
    assert err.count("\n") == 1 and BAD_TOKEN not in out + err

    monkeypatch.delenv("HF_TOKEN")  # anonymous: a private repo looks missing, as on the Hub
    code, _, err = run_cli(monkeypatch, capsys, "pull", REPO)
    assert code == 4 and f"repository {REPO} not found" in err and "private" in err

    code, _, err = run_cli(monkeypatch, capsys, "push", "nowhere-but-hub", REPO)
    assert code == 2  # not a local folder: a usage error before any request
    model_dir = save_artifact(model, tmp_path / "art")
    code, _, err = run_cli(monkeypatch, capsys, "push", str(model_dir), REPO)
    assert code == 3 and "needs a token for pushing to" in err


def test_missing_repo_revision_and_file(hub: LocalHub, model, monkeypatch, capsys) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "pull", f"{TEST_USER}/nope")
    assert (code, err) == (4, f"error: repository {TEST_USER}/nope not found on {hub.endpoint} "
                              "(if it is private, use a token that can read it: --token, "
                              "HF_TOKEN or `hf auth login`)\n")
    push_model(model, REPO)
    code, _, err = run_cli(monkeypatch, capsys, "pull", f"{REPO}@no-such-branch")
    assert (code, err) == (4, f"error: revision 'no-such-branch' not found in {REPO} on "
                              f"{hub.endpoint}\n")
    missing = rf"file weights\.safetensors not found in {REPO}@main"
    with pytest.raises(HubNotFoundError, match=missing), hub_errors(REPO, "main", hub.endpoint):
        hf_hub_download(REPO, "weights.safetensors", endpoint=hub.endpoint)

    hub.create_repo(f"{TEST_USER}/not-an-artifact")
    code, _, err = run_cli(monkeypatch, capsys, "pull", f"{TEST_USER}/not-an-artifact")
    assert code == 6 and "is not a tlreg artifact: it has no config.json" in err

    cfg = json.loads(hub.files(REPO)[CONFIG_FILE])  # a listed file missing from the repo
    cfg["files"]["training.png"] = {"sha256": "0" * 64, "size": 1}
    hub.put_file(REPO, CONFIG_FILE, json.dumps(cfg).encode())
    code, _, err = run_cli(monkeypatch, capsys, "pull", REPO)
    assert code == 6 and "training.png is listed in config.json but missing" in err


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_network_errors_and_the_offline_cache(hub: LocalHub, model,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    dead = _dead_endpoint()
    with pytest.raises(HubConnectionError, match=f"cannot reach the Hub at {dead}"):
        pull(REPO, endpoint=dead, verify=False)
    with pytest.raises(HubConnectionError, match=f"cannot reach the Hub at {dead}"):
        push_model(model, REPO, endpoint=dead)

    push_model(model, REPO)
    cached = pull(REPO, verify=False)
    with pytest.warns(UserWarning, match="using the cached copy"):
        assert pull(REPO, endpoint=dead, verify=False) == cached

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.warns(UserWarning, match="HF_HUB_OFFLINE is set.*using the cached copy"):
        assert pull(REPO, verify=False) == cached
    with pytest.raises(HubConnectionError, match=r"HF_HUB_OFFLINE is set.*not in the local cache"):
        pull(f"{TEST_USER}/never-pulled", verify=False)


# -- through the installed console script --------------------------------------------------------


def test_console_script_reports_a_rejected_token_in_one_line(hub: LocalHub, model,
                                                             tmp_path: Path) -> None:
    push_model(model, REPO, private=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "fresh_home"),
               HF_HUB_DISABLE_XET="1")
    tlreg_bin = Path(sys.executable).with_name("tlreg")
    proc = subprocess.run([str(tlreg_bin), "pull", REPO, "--token", BAD_TOKEN],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3
    assert proc.stderr == (f"error: the Hub at {hub.endpoint} rejected the token (401 "
                           "Unauthorized: Invalid credentials in Authorization header); check "
                           "--token, HF_TOKEN or `hf auth login`\n")
    assert BAD_TOKEN not in proc.stdout + proc.stderr
    assert not (tmp_path / "fresh_home" / "hub" / f"models--{TEST_USER}--ants-vs-bees").exists()


# -- the real Hub --------------------------------------------------------------------------------


def _real_hub_reachable() -> bool:
    if not os.environ.get("HF_TOKEN"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.realhub
@pytest.mark.skipif(not _real_hub_reachable(), reason="needs HF_TOKEN and huggingface.co")
def test_round_trip_on_the_real_hub(tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    endpoint = "https://huggingface.co"
    api = HfApi(endpoint=endpoint)
    repo = f"{api.whoami()['name']}/tlreg-test-{uuid.uuid4().hex[:8]}"
    model = create_model(BACKBONE, 2, pretrained=False, label_names=["a", "b"])
    nudge_head(model)
    try:
        push_model(model, repo, private=True, endpoint=endpoint)
        folder = pull(repo, endpoint=endpoint, cache_dir=tmp_path / "cache")
        loaded = load_artifact(folder)
        x = images()
        torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-6, rtol=0)
        assert inspect(f"hf:{repo}", endpoint=endpoint)["card"]["library_name"] == "tlreg"
    finally:
        api.delete_repo(repo, missing_ok=True)
