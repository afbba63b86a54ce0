"""What a folder, a run or a Hub repo holds, reported without loading a model.

The reports behind `tlreg inspect`: config, files (size, SHA-256, whether it matches the one
recorded), card metadata, and pickles present (flagged, never opened). `tlreg.sharing.api`
decides which of the three a source is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tlreg._io import MODEL_JSON, checkpoint_dir
from tlreg.errors import ArtifactError
from tlreg.hubclient import hf_api, hub_errors
from tlreg.sharing.exporters import run_metrics
from tlreg.sharing.format import CARD_FILE, CONFIG_FILE, PICKLE_SUFFIXES, file_sha256, read_config


def inspect_folder(folder: Path) -> dict[str, Any]:
    """An artifact folder's report; any file in it is listed (pickles flagged, never opened)."""
    folder = Path(folder)
    config = read_config(folder)
    files = [_file_row(n, (folder / n).stat().st_size, file_sha256(folder / n), config)
             for n in sorted(p.name for p in folder.iterdir() if p.is_file())]
    return {"source": str(folder), "kind": "artifact", "config": config, "files": files,
            "total_size": sum(f["size"] for f in files), "card": _card(folder / CARD_FILE),
            "unsafe_files": [f["name"] for f in files
                             if f["name"].lower().endswith(PICKLE_SUFFIXES)]}


def inspect_run(run_dir: Path) -> dict[str, Any]:
    """A run directory's report: its model, metrics and checkpoint files (nothing is loaded)."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / MODEL_JSON).read_text(encoding="utf-8"))
    checkpoints = {}
    for name in ("best", "last"):
        found = checkpoint_dir(run_dir / "checkpoints" / name)
        if found is not None:
            checkpoints[name] = {p.name: p.stat().st_size for p in sorted(found.iterdir())}
    return {"source": str(run_dir), "kind": "run", "info": meta.get("info"),
            "data_config": meta.get("data_config"),
            "pretrained_sha256": meta.get("pretrained_sha256"),
            "metrics": run_metrics(run_dir), "checkpoints": checkpoints}


def inspect_hub(repo_id: str, revision: str = "main", token: str | None = None,
                endpoint: str | None = None) -> dict[str, Any]:
    """A Hub repo's report: only config.json, README.md and small files are downloaded; weight
    files are checked against the SHA-256 the Hub reports for them."""
    from huggingface_hub import hf_hub_download

    api = hf_api(endpoint, token)
    with hub_errors(repo_id, revision, api.endpoint, token=token):
        info = api.repo_info(repo_id, revision=revision, files_metadata=True, repo_type="model")
        names = [s.rfilename for s in info.siblings or []]
        if CONFIG_FILE not in names:
            raise ArtifactError(f"{repo_id}@{revision} is not a tlreg artifact: it has no "
                                f"{CONFIG_FILE}")
        local = {n: Path(hf_hub_download(repo_id, n, revision=info.sha, token=token,
                                         endpoint=api.endpoint))
                 for n in (CONFIG_FILE, CARD_FILE) if n in names}
        config = read_config(local[CONFIG_FILE].parent)
        # Small files kept in git (not LFS) have no SHA-256 on the Hub: fetch them to check.
        for s in info.siblings or []:
            if s.lfs is None and s.rfilename in config["files"] and (s.size or 0) <= 1 << 20:
                local[s.rfilename] = Path(hf_hub_download(
                    repo_id, s.rfilename, revision=info.sha, token=token, endpoint=api.endpoint))
    files = []
    for s in sorted(info.siblings or [], key=lambda s: s.rfilename):
        sha = s.lfs.sha256 if s.lfs is not None else None
        if sha is None and s.rfilename in local:
            sha = file_sha256(local[s.rfilename])
        files.append(_file_row(s.rfilename, s.size, sha, config))
    return {"source": f"{repo_id}@{revision}", "kind": "hub", "repo_id": repo_id,
            "revision": revision, "commit": info.sha, "private": info.private,
            "config": config, "files": files, "total_size": sum(f["size"] or 0 for f in files),
            "card": _card(local[CARD_FILE]) if CARD_FILE in local else {},
            "unsafe_files": [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]}


def _file_row(name: str, size: int | None, sha256: str | None,
              config: Mapping[str, Any]) -> dict[str, Any]:
    recorded = (config["files"].get(name) or {}).get("sha256") if name in config["files"] else None
    status = ("ok" if sha256 == recorded else "MISMATCH") if recorded else "not recorded"
    if recorded and sha256 is None:
        status = "unknown"
    return {"name": name, "size": size, "sha256": sha256, "recorded_sha256": recorded,
            "status": status}


def _card(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path).data.to_dict()
    except Exception:  # a hand-edited card with broken YAML is not worth failing inspect
        return {}
