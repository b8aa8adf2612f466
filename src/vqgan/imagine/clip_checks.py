"""What can be known offline about which CLIP weights a file holds.

A file is "the release" only where a checksum was published with it: OpenAI's download URLs carry the file's
whole sha256 as a folder name, open_clip's release files end in the first 8 hex digits of theirs. The Hugging
Face cache names each downloaded file by its sha256 (its blob): that shows the file is intact, not which weights
it holds (anything can be put there). Anything else is recorded as "not checked"; a
file under a release's name whose sha256 differs is recorded as "not the released file" and warned about, so no
output claims weights it was not made with (random stand-ins in the tests, a corrupt download).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("vqgan.imagine")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME_PREFIX = re.compile(r"-([0-9a-f]{8})\.[a-z]+$")  # open_clip's `...-d867053b.pt`


def published_sha256(url: str) -> str | None:
    """The checksum a release URL carries: OpenAI's whole sha256 folder, or open_clip's 8-digit name suffix."""
    for part in url.split("/"):
        if _SHA256.match(part):
            return part
    found = _NAME_PREFIX.search(os.path.basename(url))
    return found.group(1) if found else None


def hf_blob_sha256(path: Path) -> str | None:
    """The sha256 a Hugging Face cache file was stored under (snapshots/REV/FILE links to blobs/SHA256)."""
    target = Path(os.path.realpath(path))
    return target.name if target.parent.name == "blobs" and _SHA256.match(target.name) else None


def tag_of_file(path: Path, tags: dict[str, dict]) -> str | None:
    """The pretrained tag a file names: the Hugging Face repo it is cached in (`models--timm--...openai/...`), or
    the release file name it carries (`vit_b_32-quickgelu-laion400m_e32-46683a32.pt`, OpenAI's `ViT-B-32.pt`)."""
    text = str(path)
    for tag, cfg in tags.items():
        repo = cfg.get("hf_hub", "").strip("/")
        if repo.count("/") > 1:
            repo = repo.rsplit("/", 1)[0]
        if repo and f"models--{repo.replace('/', '--')}" in text:
            return tag
    for tag, cfg in tags.items():
        if cfg.get("url") and os.path.basename(cfg["url"]) == path.name:
            return tag
    return None


def identity(path: Path, sha256: str, cfg: dict, label: str) -> str:
    """One phrase for the outputs: whether `path` (sha256 `sha256`) is the published file of `label` (model /
    tag, whose open_clip config is `cfg`). A file under the release's name with another sha256 is warned about."""
    blob = hf_blob_sha256(path)
    if blob is not None:
        if blob == sha256:
            return ("intact: sha256 equals the name the Hugging Face cache stored it under (which weights a file "
                    "holds, no offline check can tell)")
        log.warning("CLIP weights %s: sha256 %s... differs from the %s... it was cached under: the file changed "
                    "or is corrupt", path, sha256[:12], blob[:12])
        return "sha256 differs from the Hugging Face file it was cached as: changed or corrupt"
    url = cfg.get("url", "")
    published = published_sha256(url) if url else None
    if published is not None:
        if sha256.startswith(published):
            return f"sha256 matches the released {os.path.basename(url)} ({label})"
        if path.name == os.path.basename(url):
            log.warning("CLIP weights %s: sha256 %s... is not the released %s's (%s...): these are not the weights "
                        "of %s, and images made with them will not look like that model's", path, sha256[:12],
                        path.name, published[:12], label)
            return f"NOT the released {path.name} of {label}: sha256 differs"
    return "not checked: no published checksum for this file"
