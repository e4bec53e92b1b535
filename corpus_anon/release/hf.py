"""A release as Hugging Face `datasets` loads it: video-folder metadata and the card's YAML header (driver side).

`datasets`' video-folder builder reads a metadata file (`metadata.parquet`) whose `file_name`
column names each video relative to the metadata file's folder, never above it (`..` and URL
schemes are refused). Released clips are shared by every version under `clips/`, so each version's
metadata file sits at the release root, beside `clips/`:

    metadata.parquet              the latest version (the name the builder looks for by default)
    metadata-v0002.parquet        one per version; loaded with `metadata_filenames=[that name]`
    README.md                     the latest version's card, with a `configs:` entry per version

Rows come from the metadata file alone: a version loads only the clips its manifest lists, and a
takedown, which rewrites every version that listed a withdrawn clip, rewrites these files before
it deletes the clip. Users load a version without a video decoder:

    ds = load_dataset("videofolder", data_files=["ROOT/metadata-v0002.parquet"],
                      metadata_filenames=["metadata-v0002.parquet"], split="train")
    ds = ds.cast_column("video", Video(decode=False))   # {"path": ROOT/clips/..., "bytes": None}

(`load_release` does this, and loads an S3 root too.)
"""

from __future__ import annotations

import copy
import io
import re
from typing import Any, Callable

import yaml

from corpus_anon.io.storage import Storage, join, normalize_uri

METADATA_NAME = "metadata.parquet"
CLIPS_PATTERN = "clips/*.mp4"
CARD_NAME = "README.md"
# The release's version, kept in the metadata file's schema so the root copies know which version they show.
VERSION_KEY = b"corpus_anon_release_version"
DEFAULT_LICENSE = "other"
DEFAULT_LICENSE_NAME = "source-corpus-terms"
DEFAULT_TASKS = ("video-classification",)
TAGS = ("sign-language", "anonymized", "video")
# The Hub's size buckets (huggingface_hub's DatasetCardData documents them).
SIZE_BUCKETS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"), (1_000_000_000_000, "100B<n<1T"))
_FRONT = re.compile(r"\A---\n.*?\n---\n+", re.S)
_VERSION = re.compile(r"^v\d{4,}$")
_METADATA_FILE = re.compile(r"^metadata-v\d{4,}\.parquet$")


def metadata_name(version: str) -> str:
    """The file name of one version's metadata file at the release root (`metadata-v0002.parquet`)."""
    if not _VERSION.match(version):
        raise ValueError(f"a release version looks like v0001, not {version!r}.")
    return f"metadata-{version}.parquet"


def size_category(n: int) -> str:
    """The Hub's size bucket for `n` rows (`n<1K`, `1K<n<10K`, ... `n>1T`)."""
    if n < 0:
        raise ValueError(f"a row count is 0 or more, not {n}.")
    return next((name for limit, name in SIZE_BUCKETS if n < limit), "n>1T")


def _config(name: str, metadata: str, *, default: bool = False) -> dict[str, Any]:
    cfg: dict[str, Any] = {"config_name": name}
    if default:
        cfg["default"] = True
    cfg["data_files"] = [{"split": "train", "path": [metadata, CLIPS_PATTERN]}]
    if metadata != METADATA_NAME:
        cfg["metadata_filenames"] = [metadata]
    return cfg


def card_data(version: str, rows: list[dict[str, Any]], meta: dict[str, Any],
              versions: list[str] | None = None) -> dict[str, Any]:
    """The YAML header the Hub reads from a dataset card, as a dict: licence (`meta["license"]`,
    default `other` with `license_name`), task categories, size bucket from the row count, tags and
    `configs` whose paths are relative to the release root. Without `versions` (a version's own
    card) the one config is this version's; with them (the card at the root) `default` is the
    latest (`metadata.parquet`) and each listed version has a config of its own."""
    lic = str(meta.get("license") or DEFAULT_LICENSE)
    data: dict[str, Any] = {"license": lic}
    if lic == "other":
        data["license_name"] = str(meta.get("license_name") or DEFAULT_LICENSE_NAME)
        if meta.get("license_link"):
            data["license_link"] = str(meta["license_link"])
    if meta.get("language"):
        data["language"] = list(meta["language"]) if isinstance(meta["language"], (list, tuple)) else [meta["language"]]
    data["pretty_name"] = str(meta.get("pretty_name") or f"Anonymized sign-language corpus ({version})")
    data["task_categories"] = list(meta.get("task_categories") or DEFAULT_TASKS)
    data["size_categories"] = [size_category(len(rows))]
    data["tags"] = list(TAGS)
    if versions is None:
        data["configs"] = [_config(version, metadata_name(version), default=True)]
    else:
        data["configs"] = [_config("default", METADATA_NAME, default=True)] + \
            [_config(v, metadata_name(v)) for v in versions]
    return data


def front_matter(data: dict[str, Any]) -> str:
    """`---` YAML `---` and a blank line, to open a dataset card."""
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n\n"


def card_front_matter(version: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The header of a version's own card (`releases/vNNNN/README.md`); `render_card` puts it first."""
    return front_matter(card_data(version, rows, meta))


def file_name(root_uri: str, clip_uri: str) -> str:
    """A released clip's path relative to the release root (`clips/{name}.mp4`), as `file_name` holds it."""
    root = normalize_uri(root_uri)
    uri = normalize_uri(clip_uri)
    rel = uri[len(root) + 1:] if uri.startswith(root + "/") else ""
    if not re.fullmatch(r"clips/[^/]+\.mp4", rel):
        raise ValueError(f"a released clip lies in {join(root, 'clips')}/, not at {clip_uri}.")
    return rel


def metadata_table(root_uri: str, version: str, rows: list[dict[str, Any]], columns: list[str]) -> Any:
    """One version's metadata as a pyarrow Table: `file_name` (relative to the root), then the
    manifest's columns without `clip_uri` (an absolute location that would not survive a copy)."""
    import pyarrow as pa

    cols = [c for c in columns if c != "clip_uri"]
    data = {"file_name": pa.array([file_name(root_uri, r["clip_uri"]) for r in rows], pa.string())}
    for c in cols:
        data[c] = pa.array([r.get(c) for r in rows]) if rows else pa.array([], pa.string())
    table = pa.table(data)
    return table.replace_schema_metadata({**(table.schema.metadata or {}), VERSION_KEY: version.encode()})


def _write_table(storage: Storage, uri: str, table: Any) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def shown_version(storage: Storage, root_uri: str) -> str | None:
    """The version the root's `metadata.parquet` was made from, or None when there is none."""
    import pyarrow.parquet as pq

    uri = join(normalize_uri(root_uri), METADATA_NAME)
    try:
        schema = pq.read_schema(io.BytesIO(storage.read_bytes(uri)))
    except FileNotFoundError:
        return None
    v = (schema.metadata or {}).get(VERSION_KEY)
    return v.decode() if v else None


def listed_versions(storage: Storage, root_uri: str) -> list[str]:
    """Versions with a metadata file at the root, oldest first (one listing of `releases/`)."""
    root = normalize_uri(root_uri)
    found = set()
    for uri in storage.list(join(root, "releases"), suffixes=("release.json",)):
        v = uri.rstrip("/").split("/")[-2]
        if _VERSION.match(v):
            found.add(v)
    return [v for v in sorted(found, key=lambda v: int(v[1:])) if storage.exists(join(root, metadata_name(v)))]


def write_hf_files(storage: Storage, root_uri: str, version: str, rows: list[dict[str, Any]],
                   meta: dict[str, Any], card: str, *, latest: bool) -> None:
    """Write a version's `metadata-vNNNN.parquet` at the release root and, when it is the latest
    (`latest`) or the version the root copies were made from (a takedown amending it), the root's
    `metadata.parquet` and `README.md` (this card with the root's header: a config per version).
    Call it after the version's manifest is verified and before LATEST moves."""
    root = normalize_uri(root_uri)
    table = metadata_table(root, version, rows, list(meta["columns"]))
    _write_table(storage, join(root, metadata_name(version)), table)
    if not (latest or shown_version(storage, root) == version):
        return
    _write_table(storage, join(root, METADATA_NAME), table)
    versions = listed_versions(storage, root)
    if version not in versions:
        versions.append(version)
    body = _FRONT.sub("", card, count=1)
    storage.write_text(join(root, CARD_NAME), front_matter(card_data(version, rows, meta, versions)) + body)


def scrub_metadata(storage: Storage, root_uri: str, withdrawn: Callable[[dict[str, Any]], bool]) -> list[str]:
    """Remove the rows `withdrawn` names from every metadata file at the release root (each version's
    and the root's copy), whatever version they were written for; returns the files rewritten. A
    takedown runs it after amending the manifests and before deleting clips, so a metadata file written
    from rows read before the takedown (a release that raced it) cannot keep a withdrawn clip's row."""
    import pyarrow.parquet as pq

    root = normalize_uri(root_uri)
    names = [METADATA_NAME] + sorted(u.rsplit("/", 1)[-1] for u in storage.list(root, suffixes=(".parquet",))
                                     if _METADATA_FILE.match(u.rsplit("/", 1)[-1]))
    rewritten = []
    for name in names:
        uri = join(root, name)
        try:
            table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        except FileNotFoundError:
            continue
        rows = table.to_pylist()
        keep = [i for i, r in enumerate(rows) if not withdrawn(r)]
        if len(keep) == len(rows):
            continue
        _write_table(storage, uri, table.take(keep))  # schema and its metadata (the version) kept
        rewritten.append(name)
    return rewritten


def count_rows(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Rows of a metadata file (its Parquet footer only), local path or fsspec URL."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _read_text(url: str, storage_options: dict[str, Any] | None) -> str:
    import fsspec

    with fsspec.open(url, "rt", encoding="utf-8", **(storage_options or {})) as f:
        return f.read()


def load_release(root: str, version: str | None = None, *, cache_dir: str | None = None,
                 streaming: bool = False, storage_options: dict[str, Any] | None = None) -> Any:
    """A release version as a `datasets` Dataset (IterableDataset when `streaming`) whose `video`
    column holds `{"path", "bytes": None}` (no video decoder needed) and whose other columns are the
    manifest's; `version` None loads the latest. A local folder, or a remote root (s3://) streamed,
    loads through the video-folder builder and the metadata file. A remote root not streamed loads
    the version's `manifest.parquet` with the parquet builder instead: the video-folder builder would
    copy the metadata file into its cache and join the clips' relative paths to that copy."""
    from datasets import Video, load_dataset

    norm = root.rstrip("/")
    local = "://" not in norm or norm.startswith("file://")
    norm = norm.removeprefix("file://")
    kwargs: dict[str, Any] = {"split": "train", "streaming": streaming}
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    if storage_options:  # a copy: `datasets` adds its own keys to the dict it is given
        kwargs["storage_options"] = copy.deepcopy(storage_options)
    if not local and not streaming:
        v = version or _read_text(f"{norm}/releases/LATEST", storage_options).strip()
        if not _VERSION.match(v):
            raise ValueError(f"a release version looks like v0001, not {v[:40]!r}.")
        url = f"{norm}/releases/{v}/manifest.parquet"
    else:
        name = METADATA_NAME if version is None else metadata_name(version)
        url = f"{norm}/{name}"
        if version is not None:
            kwargs["metadata_filenames"] = [name]
    if count_rows(url, storage_options) == 0:  # `datasets` 5.2 cannot build a split from an empty metadata file
        raise ValueError(f"{url} lists no clips (every clip of this version was withdrawn or left out); "
                         "there is nothing to load.")
    if url.endswith("/manifest.parquet"):
        # Read afresh: s3fs may answer from a listing cached in this process, with a takedown's
        # rewrite not yet in it, and `datasets` would then reuse the rows it built before.
        ds = load_dataset("parquet", data_files=[url], download_mode="force_redownload",
                          **kwargs).rename_column("clip_uri", "video")
    else:
        ds = load_dataset("videofolder", data_files=[url], **kwargs)
    return ds.cast_column("video", Video(decode=False))
