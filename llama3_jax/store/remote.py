"""Remote paths (any fsspec URL but file://: gs://, s3://, ...) as local directories: readers get a
download cache, writers a staging directory that is uploaded with its completion marker last.

Why not read and write the bucket in place: llama3-jax's writes are atomic by rename (a temp file or
directory renamed when complete: checkpoint.py, integrity.py, convert/core.py), which object stores do
not have (a "rename" there is copy + delete, visible half-done); its readers memory-map safetensors and
ArrayRecord shards, and read JSONL records by seeking to byte offsets in a shuffled order, which on a
bucket is one request per record. So every remote path is turned into a local one where it enters:

- Readers (`--checkpoint`, `init_from`, convert's SRC and `--base`, `data.path`): `fetch` copies the URL
  into a cache keyed by the URL (under $LLAMA3_JAX_CACHE, default ~/.cache/llama3_jax). A file already
  cached with the remote size is kept (files under 1 MiB, such as configs and manifests, are fetched
  again), so a second run downloads only what changed. A checkpoint (a directory with numbered step
  directories) brings its top-level files and its latest *complete* step only: a step is complete once
  its manifest (integrity.MANIFEST) is there, and writers upload the manifest after every other file
  of the step; the local copy is then checked against it (sha256) like any restore.
- Writers (convert's DST, a training workdir, tools/prepare_data.py's DST) write to a local staging
  directory exactly as to a local path (atomic temp + rename), then `upload` it in an order where the
  marker comes last (`LAST`): files in subdirectories first, each directory's manifest after its other
  files, top-level files after those, config.json (Meta: params.json; prepared data: metadata.json)
  last. Without config.json a directory is no checkpoint, and without its manifest a step does not
  count, so a reader never takes a half-uploaded directory.
- A training workdir (`WorkdirMirror`): `pull` at start brings the run's files (config.json,
  train_config.json, metrics.jsonl, ...) and its latest complete step, and deletes remote steps newer
  than that one, uploads that never finished; `push` runs each time the checkpoint manager has sealed
  a step: the new steps, then remote steps beyond `keep_checkpoints` pruned, then the run's files. The
  upload runs in the training thread (the next step waits for it). A run killed between sealing a
  step and uploading it (or its metrics lines) leaves local work newer than the remote: `pull` keeps
  it (a step above the remote's latest complete one, a run file that extends the remote's copy, a
  file the remote lacks) and the next push uploads it, so restarting on the same machine loses nothing.
- Object keys are names chosen by whoever wrote the bucket: `..` is legal in GCS and S3 keys, and
  `model//x` has the relative part `/x`. `listing` refuses a key that is not a plain relative path
  (safe_paths.py, the check convert's index files use too) and `download` checks that every target
  lies inside its destination, so no key writes outside the cache or staging directory.

Several processes: process 0 alone uploads (and pulls a workdir), so the staging directory must be one
that every process sees: $LLAMA3_JAX_STAGING on a shared file system (required then, since each
host's own disk would hold only its processes' shards). Read caches are per process: a file lands by
rename, so processes that share one cache directory never read half a file.

Limits: a remote file replaced by another of the same size (>= 1 MiB) is not noticed by the cache
(clear it); checkpoint steps are compared by manifest, so they are. The cache is never pruned. A
checkpoint copied to a bucket by hand counts only the steps that carry a manifest (every step saved
by this version has one). Orbax
could write gs:// itself (epath + tensorstore), which would let a pod's hosts share a remote workdir
without a shared disk, but integrity.py's manifests, checkpoint.remove_unfinished and the set-aside
rename work on local paths, and no bucket is at hand to test it: not done.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

from . import integrity
from ..parallel.distributed import is_main, process_count, sync
from .paths import filesystem, MOUNT_HINT
from .safe_paths import UnsafePath, inside, problem

CACHE_ENV, STAGING_ENV = "LLAMA3_JAX_CACHE", "LLAMA3_JAX_STAGING"
SMALL = 1 << 20  # files smaller than this are fetched again every time (configs, manifests, metrics)
# markers, uploaded after their directory's other files (in this order): a step's manifest, prepared
# data's metadata.json (data/prepared.py), a checkpoint's config.json, a Meta checkpoint's params.json
LAST = (integrity.MANIFEST, "metadata.json", "config.json", "params.json")


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama3_jax"


def _slot(url: str) -> str:
    """A directory name for `url`: its last part (readable) + a hash of the whole URL (unique)."""
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40] or "root"
    return f"{tail}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:12]}"


def staging_dir(url: str, what: str) -> Path:
    """The local directory a remote DST or workdir is written to before upload."""
    shared = os.environ.get(STAGING_ENV)
    if process_count() > 1 and not shared:
        raise ValueError(f"{what} {url}: several processes write a remote path through one staging directory "
                         f"that all of them see: set {STAGING_ENV} to a directory on a shared file system, or "
                         f"{MOUNT_HINT}")
    return (Path(shared) if shared else cache_root() / "staging") / _slot(url)


def listing(fs, root: str) -> dict[str, int]:
    """{relative posix path: size} of every file under `root` (empty if there is nothing). A key whose
    relative part would leave a local directory (`..`, absolute, a backslash: safe_paths.problem) is a
    one-line ValueError naming it, so no reader or writer ever joins it to a path."""
    if not fs.exists(root):
        return {}
    if fs.isfile(root):
        return {"": fs.size(root)}
    root = root.rstrip("/")
    out = {}
    for name, info in fs.find(root, detail=True).items():
        name = fs._strip_protocol(name)
        if info.get("type") == "file" and name.startswith(root + "/"):
            rel = name[len(root) + 1:]
            if (why := problem(rel)) is not None:
                raise ValueError(f"object key {name!r} {why}: refusing to copy it or anything else of {root}")
            out[rel] = int(info.get("size") or 0)
    return out


def steps(files: dict[str, int]) -> dict[int, bool]:
    """{step: complete} of the numbered step directories in a listing (complete: its manifest is there)."""
    out: dict[int, bool] = {}
    for rel in files:
        top, _, rest = rel.partition("/")
        if top.isdigit() and rest:
            out[int(top)] = out.get(int(top), False) or rest == integrity.MANIFEST
    return out


def checkpoint_files(files: dict[str, int], url: str) -> dict[str, int]:
    """The part of a checkpoint's listing a reader needs: top-level files + the latest complete step.
    Incomplete steps newer than it (an upload that never finished) are reported and left out."""
    found = steps(files)
    complete = sorted(s for s, ok in found.items() if ok)
    latest = complete[-1] if complete else None
    for s in sorted(found):
        if not found[s] and (latest is None or s > latest) and is_main():
            print(f"remote: {url} step {s} has no {integrity.MANIFEST} (an upload that never finished): ignored",
                  file=sys.stderr)
    return {rel: n for rel, n in files.items()
            if "/" not in rel or (latest is not None and rel.split("/", 1)[0] == str(latest))}


def _get(fs, remote: str, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(f".{local.name}.part-{os.getpid()}")
    try:
        fs.get_file(remote, str(part))
        os.replace(part, local)
    finally:
        part.unlink(missing_ok=True)


def download(fs, root: str, files: dict[str, int], dest: Path, keep: frozenset[str] = frozenset()) -> int:
    """Make `dest` hold exactly `files` of `root`: fetch what is missing, of another size or small;
    a step whose manifest differs from the cached one is fetched whole; delete the rest. Returns the
    bytes fetched. Files the caller `keep`s (WorkdirMirror.pull: local work newer than the remote) are
    neither fetched nor deleted. Every target is checked to lie inside `dest` before anything is written."""
    dest.mkdir(parents=True, exist_ok=True)
    files = {rel: n for rel, n in files.items() if rel not in keep}
    for rel in files:
        try:
            inside(dest, rel)
        except UnsafePath as e:
            raise ValueError(f"{root}/{rel}: object key {e}: refusing to copy it into {dest}") from None
    for rel in files:
        if rel.endswith("/" + integrity.MANIFEST) and (dest / rel).is_file():
            if fs.cat_file(f"{root}/{rel}") != (dest / rel).read_bytes():  # another save of that step
                shutil.rmtree(dest / rel.rsplit("/", 1)[0], ignore_errors=True)
    fetched = 0
    for rel, size in sorted(files.items(), key=lambda kv: upload_key(kv[0])):  # manifests last here too
        local = dest / rel
        if size >= SMALL and local.is_file() and local.stat().st_size == size:
            continue
        _get(fs, f"{root}/{rel}", local)
        fetched += size
    for p in sorted(dest.rglob("*"), reverse=True):  # deepest first, so emptied directories go too
        rel = p.relative_to(dest).as_posix()
        if ".part-" in p.name:  # another process's download in flight
            continue
        if p.is_file() and rel not in files and rel not in keep:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    return fetched


def fetch(url: str, what: str) -> str:
    """A local copy of a remote file or directory (a checkpoint: top-level files + latest complete step)."""
    fs, root = filesystem(url, what)
    files = listing(fs, root)
    if not files:
        raise FileNotFoundError(f"{what} {url}: not found")
    dest = cache_root() / "remote" / _slot(url)
    if "" in files:  # a single file
        dest.mkdir(parents=True, exist_ok=True)
        name = root.rsplit("/", 1)[-1]
        _report(url, download(fs, root.rsplit("/", 1)[0], {name: files[""]}, dest), dest)
        return str(dest / name)
    if steps(files):
        files = checkpoint_files(files, url)
    _report(url, download(fs, root, files, dest), dest)
    return str(dest)


def _report(url: str, fetched: int, dest: Path) -> None:
    if fetched and is_main():
        print(f"remote: fetched {fetched / 2**20:.1f} MiB of {url} into {dest}", file=sys.stderr)


def upload_key(rel: str) -> tuple:
    """Upload order: deeper files first, within a directory its marker (LAST) after the rest, config.json
    (then params.json) of the top level at the very end."""
    parts = rel.split("/")
    name = parts[-1]
    return (-len(parts), name in LAST, LAST.index(name) if name in LAST else -1, rel)


def upload(local: Path, url: str, what: str, rels=None) -> None:
    """Copy `local` (a directory) to `url`, `rels` (default: every file) in `upload_key` order."""
    fs, root = filesystem(url, what)
    local = Path(local)
    if rels is None:
        rels = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    made = set()
    for rel in sorted(rels, key=upload_key):
        parent = f"{root}/{rel}".rsplit("/", 1)[0]
        if parent not in made:
            fs.makedirs(parent, exist_ok=True)
            made.add(parent)
        fs.put_file(str(local / rel), f"{root}/{rel}")


class WorkdirMirror:
    """A training workdir at a URL, run in a local staging directory (`local`): `pull` before the run,
    `push` after each sealed checkpoint and at the end. Process 0 does the transfers."""

    def __init__(self, url: str, keep: int | None):
        self.url, self.keep = url.rstrip("/"), keep
        self.fs, self.root = filesystem(url, "workdir")
        self.local = staging_dir(url, "workdir")

    def pull(self) -> None:
        """Bring the run's files and its latest complete step into `local`, delete remote steps newer
        than that one that never finished uploading, and keep the local work that is newer than the
        remote (`_newer_here`): pull never deletes or overwrites it, the next push uploads it."""
        if is_main():
            files = listing(self.fs, self.root)
            found = steps(files)
            complete = [s for s, ok in found.items() if ok]
            latest = max(complete, default=None)
            keep = self._newer_here(files, latest)
            if found and not complete and not any(_sealed_step(rel) for rel in keep):
                raise ValueError(f"workdir {self.url}: no step has its {integrity.MANIFEST} (uploads that never "
                                 f"finished, or steps copied by hand: seal them or start a new workdir)")
            for s in sorted(s for s, ok in found.items() if not ok and s > (latest or -1)):
                self.fs.rm(f"{self.root}/{s}", recursive=True)
                print(f"remote: removed {self.url}/{s}, an upload that never finished (no {integrity.MANIFEST})",
                      file=sys.stderr)
            unpushed = [rel for rel in keep if not Path(rel).name.startswith(".")
                        and (not _in_step(Path(rel)) or rel.split("/", 1)[0].isdigit())]
            if unpushed:
                print(f"remote: kept {len(unpushed)} file(s) of {self.local} newer than {self.url} (a step sealed "
                      f"here, lines not pushed yet): the next push uploads them", file=sys.stderr)
            _report(self.url, download(self.fs, self.root, checkpoint_files(files, self.url), self.local, keep),
                    self.local)
        sync("llama3_jax_remote_pull")

    def _newer_here(self, remote: dict[str, int], latest: int | None) -> frozenset[str]:
        """The local files that are newer than the remote: every file of a step directory above the
        remote's latest complete step (sealed here, never or half uploaded), of a set-aside or unfinished
        step (`N.corrupt`, orbax's temp: local only, never uploaded), and each run file (metrics.jsonl,
        tensorboard events, ...) that the remote lacks or holds a shorter copy of that the local one
        extends (lines not pushed yet). A remote file that the local one does not extend wins."""
        if not self.local.is_dir():
            return frozenset()
        keep = set()
        for p in self.local.rglob("*"):
            rel = p.relative_to(self.local)
            if not p.is_file() or ".part-" in p.name:
                continue
            if _in_step(rel):
                top = rel.parts[0]
                if not top.isdigit() or latest is None or int(top) > latest:
                    keep.add(rel.as_posix())
            elif rel.as_posix() not in remote or self._extends(p, rel.as_posix(), remote[rel.as_posix()]):
                keep.add(rel.as_posix())
        return frozenset(keep)

    def _extends(self, local: Path, rel: str, remote_size: int) -> bool:
        """Whether the local file is the remote one with more bytes after it (appended here since)."""
        if local.stat().st_size <= remote_size:
            return False
        with open(local, "rb") as f:
            return f.read(remote_size) == self.fs.cat_file(f"{self.root}/{rel}")

    def push(self) -> None:
        """Upload the sealed local steps the remote lacks (manifest last), prune remote steps beyond
        `keep` (after the new ones are up), then the run's other files (config.json last)."""
        if not is_main():
            return
        remote = listing(self.fs, self.root)
        remote_steps = steps(remote)
        local_steps = sorted(int(p.name) for p in self.local.iterdir()
                             if p.name.isdigit() and (p / integrity.MANIFEST).is_file())
        for s in local_steps:
            manifest = (self.local / str(s) / integrity.MANIFEST).read_bytes()
            if remote_steps.get(s) and self.fs.cat_file(f"{self.root}/{s}/{integrity.MANIFEST}") == manifest:
                continue
            if s in remote_steps:
                self.fs.rm(f"{self.root}/{s}", recursive=True)
            upload(self.local / str(s), f"{self.url}/{s}", "workdir")
        if self.keep:
            kept = sorted({s for s, ok in remote_steps.items() if ok} | set(local_steps))[-self.keep:]
            for s in remote_steps:
                if s not in kept:
                    self.fs.rm(f"{self.root}/{s}", recursive=True)
        run_files = [p.relative_to(self.local).as_posix() for p in self.local.rglob("*") if p.is_file()
                     and not _in_step(p.relative_to(self.local)) and not p.name.startswith(".")]
        changed = [rel for rel in run_files if (self.local / rel).stat().st_size < SMALL
                   or remote.get(rel) != (self.local / rel).stat().st_size]
        upload(self.local, self.url, "workdir", changed)


def _sealed_step(rel: str) -> bool:
    """Whether a workdir path is a numbered step's manifest (the step was sealed)."""
    top, _, rest = rel.partition("/")
    return top.isdigit() and rest == integrity.MANIFEST


def _in_step(rel: Path) -> bool:
    """Whether a workdir path lies in a step directory (`N`, `N.corrupt`, orbax's `N.orbax-checkpoint-tmp*`)."""
    return len(rel.parts) > 1 and rel.parts[0].split(".", 1)[0].isdigit()
