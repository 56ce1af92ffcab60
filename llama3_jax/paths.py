"""Paths given as URLs: `file://` is the local file system; object stores are refused, naming a way in.

Every path a user gives (convert's SRC, DST and --base, `workdir`, `init_from`, `data.path`, generate's
and score's --checkpoint) goes through `local_path` once, where it enters: `file:///data/run` is
`/data/run`, so the rest of the code reads and writes local files only, and its atomic writes (temp
file or directory + rename, checkpoint.py, convert/core.py) keep their meaning.

`gs://` and other object-store URLs are refused with a one-line error: llama3-jax's own writes rely on
an atomic rename, which buckets do not have (etils.epath, which orbax uses, would copy then delete),
and its readers memory-map safetensors and ArrayRecord files. Mount the bucket instead (Cloud Storage
FUSE: `gcsfuse --implicit-dirs BUCKET /gcs/BUCKET`, or the GKE CSI driver) and give the mounted path.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

MOUNT_HINT = "mount the bucket (e.g. gcsfuse --implicit-dirs BUCKET /gcs/BUCKET) and give the mounted path"


def local_path(path: str | None, what: str) -> str | None:
    """`path` as a local path: a `file://` URL decoded (`file:///a%20b` -> `/a b`), a plain path as it
    is, None as None. ValueError naming `what` (the key or flag) for any other URL."""
    if path is None:
        return None
    text = str(path)
    if "://" not in text:
        return text
    url = urlsplit(text)
    if url.scheme != "file":
        raise ValueError(f"{what} {text}: {url.scheme}:// paths are not read directly; {MOUNT_HINT}")
    if url.netloc not in ("", "localhost"):
        raise ValueError(f"{what} {text}: a file:// URL names this machine's files (file:///PATH), not {url.netloc}'s")
    if url.query or url.fragment:
        raise ValueError(f"{what} {text}: a file:// URL takes no query or fragment")
    return unquote(url.path)
