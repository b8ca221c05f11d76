"""``edgekit fleet samples pull DEVICE``: fetch the samples a device captured into a dataset folder.

The device keeps them with ``edgekit-runtime serve|stream --capture-dir DIR`` (see
``edgekit_runtime/capture.py``): ``DIR/YYYY-MM-DD/STEM.jpg`` and ``STEM.json`` (model, result,
confidence, why it was kept). They come over SFTP — the same SSH login, host-key checks and
identity options as ``edgekit flash --host`` — and land where ``edgekit train`` reads them, labelled
with what the model answered, for a person to review:

* classification: ``OUT/<predicted label>/STEM.jpg`` (one folder per class, the ImageFolder layout);
* detection: ``OUT/images/STEM.jpg`` and ``OUT/annotations.json`` (COCO, the predicted boxes);
* anything else: ``OUT/unlabelled/STEM.jpg``.

Every sample's sidecar, with the device and its local path, is appended to ``OUT/samples.jsonl``.
Pulling again fetches only what is new (a sample already in ``samples.jsonl`` is skipped);
``delete`` removes each sample from the device once its copy is on disk here (sidecar first).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import stat
from pathlib import Path
from typing import Any

from .ssh import FlashError, _connect, _load_identity, _Settings, parse_target

log = logging.getLogger("edgekit.flash.samples")


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _safe_name(name: object) -> bool:
    """A plain file name from the device: no folder part, no '..', not hidden (a device is not trusted with
    paths on this machine, nor with naming files elsewhere on itself)."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and name == posixpath.basename(name)
            and "\\" not in name and "\0" not in name and not name.startswith("."))


def _label_dir(name: str) -> str:
    bad = '/\\\0:'
    clean = "".join("_" if c in bad else c for c in name).strip(". ") or "unnamed"
    return clean[:100]


def _coco_add(coco: dict[str, Any], file_name: str, result: dict[str, Any]) -> None:
    w, h = result.get("image_size", [0, 0])
    image_id = max((im["id"] for im in coco["images"]), default=0) + 1
    coco["images"].append({"id": image_id, "file_name": file_name, "width": w, "height": h})
    cats = {c["name"]: c["id"] for c in coco["categories"]}
    for d in result.get("detections", []):
        if d["label"] not in cats:
            cats[d["label"]] = len(cats) + 1
            coco["categories"].append({"id": cats[d["label"]], "name": d["label"]})
        x0, y0, x1, y1 = d["box"]
        coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                    "category_id": cats[d["label"]], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "score": d["score"]})


def pull_samples(target: str, remote_dir: str, out: Path, *, device: str | None = None, port: int | None = None,
                 identity: Path | None = None, known_hosts: Path | None = None, accept_new_host_key: bool = False,
                 delete: bool = False, timeout: float = 30.0) -> dict[str, Any]:
    """Fetch the samples under ``remote_dir`` on ``target`` (``user@host[:port]``) into ``out``."""
    if not remote_dir or remote_dir.startswith(("-", "~")):
        raise FlashError(f"bad --remote-dir {remote_dir!r}: give the device's capture folder as an absolute path")
    settings = _Settings(parse_target(target, port), _load_identity(identity) if identity else None,
                         Path(identity).expanduser() if identity else None,
                         Path(known_hosts).expanduser() if known_hosts else None, accept_new_host_key, timeout)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "samples.jsonl"
    seen = set()
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            try:
                doc = json.loads(line)
                seen.add((doc.get("device"), doc["remote"]))
            except (ValueError, KeyError):
                continue
    coco_path = out / "annotations.json"
    coco = json.loads(coco_path.read_text()) if coco_path.exists() else {"images": [], "annotations": [],
                                                                       "categories": []}
    counts = {"pulled": 0, "already_here": 0, "deleted": 0, "skipped_incomplete": 0, "by_kind": {}}
    device = device or settings.target.host
    client, _ = _connect(settings)
    try:
        sftp = client.open_sftp()
        try:
            days = sorted(e.filename for e in sftp.listdir_attr(remote_dir) if stat.S_ISDIR(e.st_mode or 0))
        except FileNotFoundError:
            raise FlashError(f"{settings.target} has no capture folder {remote_dir}: start serve/stream with "
                             "--capture-dir there, or pass the folder it uses as --remote-dir") from None
        with log_path.open("a") as log_file:
            for day in days:
                if not _safe_name(day):
                    continue
                folder = posixpath.join(remote_dir, day)
                names = sorted(sftp.listdir(folder))
                for name in names:
                    if not name.endswith(".json") or name.startswith("."):
                        continue
                    remote_side = posixpath.join(folder, name)
                    try:
                        with sftp.open(remote_side, "rb") as fh:
                            doc = json.loads(fh.read())
                        image_name = doc["image"]
                        if not _safe_name(image_name) or not isinstance(doc.get("result"), dict):
                            raise ValueError(f"not a sample sidecar: image {image_name!r}")
                        remote_image = posixpath.join(folder, image_name)
                    except (OSError, ValueError, KeyError, TypeError) as exc:
                        counts["skipped_incomplete"] += 1  # being written, or not a sample
                        log.warning("skipping %s: %s", remote_side, exc)
                        continue
                    key = (device, remote_image)
                    if key in seen:
                        counts["already_here"] += 1
                    else:
                        local = _place(out, doc, day)
                        try:
                            with sftp.open(remote_image, "rb") as fh:
                                fh.prefetch()
                                data = fh.read()
                        except OSError:  # evicted on the device between its sidecar and its image
                            counts["skipped_incomplete"] += 1
                            continue
                        local.parent.mkdir(parents=True, exist_ok=True)
                        _atomic(local, data)
                        kind = _kind(doc["result"])
                        if kind == "detection":
                            _coco_add(coco, str(local.relative_to(out / "images")), doc["result"])
                        counts["by_kind"][kind] = counts["by_kind"].get(kind, 0) + 1
                        log_file.write(json.dumps({**doc, "device": device, "remote": remote_image,
                                                   "local": str(local.relative_to(out))}) + "\n")
                        log_file.flush()
                        seen.add(key)
                        counts["pulled"] += 1
                    if delete:
                        sftp.remove(remote_side)  # the sidecar first: an image alone is not a sample
                        try:
                            sftp.remove(remote_image)
                        except FileNotFoundError:
                            pass
                        counts["deleted"] += 1
        sftp.close()
    finally:
        client.close()
        if coco["images"]:  # also after a failure: samples.jsonl already says these were pulled
            _atomic(coco_path, json.dumps(coco, indent=1).encode())
    return {"ok": True, "device": device, "host": str(settings.target), "remote_dir": remote_dir, "out": str(out),
            **counts}


def _kind(result: dict[str, Any]) -> str:
    if result.get("top_k"):
        return "classification"
    if "detections" in result:
        return "detection"
    return "other"


def _place(out: Path, doc: dict[str, Any], day: str) -> Path:
    """Where a sample goes here: by its predicted class, into COCO's images/, or unlabelled/."""
    name = f"{day}-{doc['image']}"
    kind = _kind(doc["result"])
    if kind == "classification":
        return out / _label_dir(str(doc["result"]["top_k"][0]["label"])) / name
    if kind == "detection":
        return out / "images" / name
    return out / "unlabelled" / name
