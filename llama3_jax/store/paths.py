"""Paths given as URLs: which are local, which are remote, and the file system a remote one lives on.

Every path a user gives (convert's SRC, DST and --base, `workdir`, `init_from`, `data.path`, generate's
and score's --checkpoint) goes through `resolve` once, where it enters: a plain path stays as it is,
`file:///data/run` becomes `/data/run` (so `file://` reads and writes exactly as a plain path does), and
any other URL (`gs://`, `s3://`, `memory://`, fsspec's `local://` ...) is kept as a URL after checking
that fsspec can open its scheme, so a missing gcsfs is a one-line error at start-up rather than after
an hour of training. remote.py turns those URLs into local directories (download caches, upload
staging); everything past it reads and writes local files only. `local_path` is for the few paths
that must be local (tools/prepare_data.py's DST): it refuses remote URLs, naming a way in.

Tests use `local://` (fsspec's local file system under a remote-only scheme: it survives a subprocess)
and `memory://` as the stand-in for a bucket: the same fsspec code path as `gs://`, a real file system.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

MOUNT_HINT = "mount the bucket (e.g. gcsfuse --implicit-dirs BUCKET /gcs/BUCKET) and give the mounted path"
EXTRA = {"gs": "gcs", "gcs": "gcs"}  # scheme -> the llama3-jax extra that installs its fsspec backend


def is_remote(path) -> bool:
    """Whether `path` is a URL that remote.py handles (any scheme but file://)."""
    return path is not None and "://" in str(path) and urlsplit(str(path)).scheme != "file"


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
        raise ValueError(f"{what} {text}: {url.scheme}:// paths are not accepted here; {MOUNT_HINT}")
    if url.netloc not in ("", "localhost"):
        raise ValueError(f"{what} {text}: a file:// URL names this machine's files (file:///PATH), not {url.netloc}'s")
    if url.query or url.fragment:
        raise ValueError(f"{what} {text}: a file:// URL takes no query or fragment")
    return unquote(url.path)


def resolve(path: str | None, what: str) -> str | None:
    """A plain path or file:// URL as a local path (local_path); a remote URL unchanged, once fsspec
    has shown it can open its scheme (`filesystem`)."""
    if is_remote(path):
        filesystem(str(path), what)
        return str(path)
    return local_path(path, what)


def filesystem(url: str, what: str):
    """(fsspec file system, path on it) for a remote URL. A scheme whose backend is not installed is a
    one-line ValueError naming the package (gs://: `pip install 'llama3-jax[gcs]'`) and the mount."""
    scheme = urlsplit(url).scheme
    try:
        from fsspec.core import url_to_fs
        fs, root = url_to_fs(url)
    except ImportError as e:
        need = (f"pip install 'llama3-jax[{EXTRA[scheme]}]'" if scheme in EXTRA
                else f"its fsspec backend ({(str(e).strip().splitlines() or ['not installed'])[0]})")
        raise ValueError(f"{what} {url}: {scheme}:// needs {need}, or {MOUNT_HINT}") from None
    except ValueError as e:  # "Protocol not known: ..."
        raise ValueError(f"{what} {url}: {(str(e).splitlines() or ['unknown scheme'])[0]}") from None
    return fs, root.rstrip("/") or "/"
