"""Parse any URI and resolve it to an immutable `Resolved` (a cache key plus what it stands for).

Two steps, so a cache hit stays cheap:
- `identify(uri)` finds the key. A pinned registry URI (`models:/n/3`, `models:/m-<id>`, `runs:/...`) needs no
  network at all; a mutable one (`latest`, a stage, an alias, an s3:// prefix) asks its origin once, or uses the
  ref written by the last answer while it is younger than the TTL (and any ref when the origin is unreachable).
- `locate(resolved)` finds the storage location and the file listing: only needed on a miss.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from urllib.parse import urlparse

from . import registry
from .config import Settings
from .errors import BadURI, PrefetchError, Unreachable
from .redact import redact_obj, redact_text, redact_uri
from .sources.base import FileEntry
from .store import Store

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]+$")
_MODEL_ID = re.compile(r"^m-[A-Za-z0-9]+$")
_FSSPEC_LOCAL = ("file", "local", "")
_S3_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")   # botocore's own check, before any call


@dataclasses.dataclass(frozen=True)
class Target:
    """What a URI asks for, before any network call."""

    kind: str          # model_version | model_latest | model_stage | model_alias | logged_model | run |
    uri: str           # mlflow_artifacts | s3 | local | fsspec
    name: str | None = None
    version: str | None = None
    stage: str | None = None
    alias: str | None = None
    model_id: str | None = None
    run_id: str | None = None
    path: str = ""

    @property
    def mutable(self) -> bool:
        return self.kind in ("model_latest", "model_stage", "model_alias", "s3", "mlflow_artifacts", "fsspec", "local")

    @property
    def registry_kind(self) -> bool:
        return self.kind.startswith("model_") or self.kind in ("logged_model", "run")


@dataclasses.dataclass(frozen=True)
class Resolved:
    uri: str                      # as asked
    key: str                      # objects/<key>
    kind: str
    identity: dict                # what the key is a hash of
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    model_id: str | None = None
    storage_uri: str | None = None
    files: tuple[FileEntry, ...] | None = None
    offline: bool = False         # registry/origin unreachable: answered from the last known ref
    note: str | None = None       # said to the user along with the answer (e.g. why offline)
    resolved_at: float = dataclasses.field(default_factory=time.time)
    # The opened origin that produced `files` (storage URIs), reused by locate(); never serialized.
    source: object = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # The identity is stored (manifests, refs) and hashed into the key: never with credentials in it.
        object.__setattr__(self, "identity", _strip_credentials(self.identity))

    @property
    def bytes(self) -> int | None:
        return None if self.files is None else sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("files", "source")}
        if self.files is not None:
            d["files"] = [dataclasses.asdict(f) for f in self.files]
            d["bytes"] = self.bytes
        return redact_obj(d)


def parse(uri: str) -> Target:
    """Syntax only; raises BadURI naming what is wrong."""
    if not isinstance(uri, str) or not uri.strip():
        raise BadURI("empty URI", str(uri))
    uri = uri.strip()
    try:
        parsed = urlparse(uri)
        parsed.netloc and parsed.port   # noqa: B018 - urlparse checks brackets and ports only when asked
    except ValueError as e:
        raise BadURI(f"not a valid URI ({e})", uri) from None
    scheme = parsed.scheme.lower()
    if scheme == "models":
        return _parse_models(uri)
    if scheme == "runs":
        rest = uri[len("runs:"):].lstrip("/")
        run_id, _, path = rest.partition("/")
        if not run_id or not _RUN_ID.match(run_id):
            raise BadURI("expected runs:/<run_id>/<path>", uri)
        return Target("run", uri, run_id=run_id, path=path.strip("/"))
    if scheme == "mlflow-artifacts":
        if not parsed.path.strip("/"):
            raise BadURI("expected mlflow-artifacts:/<path>", uri)
        return Target("mlflow_artifacts", uri, path=parsed.path.strip("/"))
    if scheme in ("http", "https") and "/api/2.0/mlflow-artifacts/artifacts/" in uri:
        return Target("mlflow_artifacts", uri, path=parsed.path.split("/api/2.0/mlflow-artifacts/artifacts/", 1)[1])
    if scheme in ("s3", "s3a", "s3n"):
        if not parsed.netloc:
            raise BadURI("expected s3://<bucket>/<prefix>", uri)
        if not _S3_BUCKET.match(parsed.netloc):
            raise BadURI(f"'{parsed.netloc}' is not a valid S3 bucket name (letters, digits, '.', '-', '_')", uri)
        return Target("s3", uri, path=parsed.path.strip("/"))
    if scheme in _FSSPEC_LOCAL or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):
        if scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise BadURI("file:// URIs must be absolute local paths (file:///path)", uri)
        return Target("local", uri, path=parsed.path if scheme == "file" else uri)
    import fsspec

    if scheme not in fsspec.available_protocols():
        raise BadURI(f"unknown URI scheme '{scheme}:' (expected models:/, runs:/, mlflow-artifacts:/, s3://, "
                     f"file://, a local path or an fsspec URL)", uri)
    if "://" not in uri:
        raise BadURI(f"expected {scheme}://...", uri)
    return Target("fsspec", uri, path=uri.split("://", 1)[1])


def _parse_models(uri: str) -> Target:
    rest = uri[len("models:"):]
    if not rest.startswith("/") or not rest.strip("/"):
        raise BadURI("expected models:/<name>/<version|latest|stage>, models:/<name>@<alias> or models:/m-<id>", uri)
    parts = rest.strip("/").split("/")
    if len(parts) > 2 or any(not p.strip() for p in parts):
        raise BadURI("expected models:/<name>/<version|latest|stage>, models:/<name>@<alias> or models:/m-<id>", uri)
    if len(parts) == 2:
        name, suffix = parts
        if "@" in name:
            raise BadURI("a models:/ URI has either a /suffix or an @alias, not both", uri)
        if suffix.isdigit():
            return Target("model_version", uri, name=name, version=str(int(suffix)))
        if suffix.lower() == "latest":
            return Target("model_latest", uri, name=name)
        if suffix.lower() in registry.STAGES:
            return Target("model_stage", uri, name=name, stage=registry.STAGES[suffix.lower()])
        raise BadURI(f"'{suffix}' is not a version number, 'latest' or a stage "
                     f"(None, Staging, Production, Archived)", uri)
    only = parts[0]
    if "@" in only:
        name, _, alias = only.rpartition("@")
        if not name or not alias:
            raise BadURI("expected models:/<name>@<alias>", uri)
        return Target("model_alias", uri, name=name, alias=alias)
    if _MODEL_ID.match(only):
        return Target("logged_model", uri, model_id=only)
    raise BadURI(f"models:/{only} names no version: add /<version>, /latest, /<stage> or @<alias> "
                 "(or use models:/m-<id> for a logged model)", uri)


# -- keys ------------------------------------------------------------------------------------------------
def make_key(slug: str, identity: dict) -> str:
    # Credentials are not identity: the same model reached with two tokens is one object (redact_uri drops them).
    identity = _strip_credentials(identity)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", redact_text(slug)).strip("-.")[:64] or "artifact"
    return f"{clean}--{digest}"


def _strip_credentials(obj):
    if isinstance(obj, str):
        return redact_uri(obj) if "://" in obj else redact_obj(obj)
    if isinstance(obj, dict):
        return {k: _strip_credentials(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strip_credentials(v) for v in obj]
    return obj


def _ref_id(identity: dict) -> str:
    identity = _strip_credentials(identity)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _version_identity(mv: dict) -> tuple[str, dict]:
    """A registry version is its name and number *and* what it was made from: a model deleted and registered
    again under the same name restarts at v1 with another run and storage location, and must not be served the
    old v1 from cache."""
    identity = {"kind": "model_version", "registry": redact_uri(registry.registry_uri()), "name": mv["name"],
                "version": str(mv["version"]), "run_id": mv.get("run_id"), "model_id": mv.get("model_id"),
                "source": redact_uri(mv.get("source") or "")}
    return make_key(f"{mv['name']}-v{mv['version']}", identity), identity


def _version_ref_id(name: str, version: str) -> str:
    """The ref that remembers which key `name` v`version` is: what lets a pinned URI hit with no network."""
    return _ref_id({"version_of": name, "version": str(version), "registry": registry.registry_uri()})


def _resolved_version(uri: str, kind: str, mv: dict, store: Store) -> Resolved:
    key, identity = _version_identity(mv)
    resolved = Resolved(uri, key, kind, identity, name=mv["name"], version=str(mv["version"]), run_id=mv["run_id"],
                        model_id=mv["model_id"])
    # Every answer of the registry updates the version's ref: pinned URIs follow a re-registered version.
    store.write_ref(_version_ref_id(mv["name"], mv["version"]),
                    {"uri": f"models:/{mv['name']}/{mv['version']}", "key": key, "kind": "model_version",
                     "identity": identity, "name": mv["name"], "version": str(mv["version"]),
                     "run_id": mv["run_id"], "model_id": mv["model_id"], "storage_uri": None,
                     "resolved_at": resolved.resolved_at})
    return resolved


def _identify_version(uri: str, target: Target, store: Store) -> Resolved:
    """models:/<name>/<n>: the version's ref when there is one (no network: a hit stays free), else one registry
    call. When the registry is down and there is no ref, a cached object of that version still answers.
    A ref whose object is not cached is not trusted: a miss goes to the registry anyway, and the version may have
    been registered again since (its bytes must land under the new key, not the ref's)."""
    ref = store.read_ref(_version_ref_id(target.name, target.version))
    if ref and store.lookup(ref["key"], touch=False) is not None:
        return _from_ref(uri, ref, offline=False)
    try:
        mv = registry.model_version(uri, target.name, version=target.version)
    except Unreachable as e:
        registry_id = redact_uri(registry.registry_uri())
        for m in store.manifests():
            ident = m.identity
            if (ident.get("kind"), ident.get("registry"), ident.get("name"), ident.get("version")) == \
                    ("model_version", registry_id, target.name, target.version):
                return Resolved(uri, m.key, "model_version", ident, name=target.name, version=target.version,
                                run_id=ident.get("run_id"), model_id=ident.get("model_id"), offline=True,
                                note=f"registry unreachable ({e}); using the cached copy of this version")
        raise
    return _resolved_version(uri, target.kind, mv, store)


def recheck(uri: str, settings: Settings, store: Store) -> str | None:
    """The daemon's interval re-check of a pinned registry version: ask the registry what the version is made
    of now and update its ref (a re-registered v1 becomes a new key on the next warm). Returns the key, or None
    when there is nothing to check or the registry cannot be reached (the cached answer stands)."""
    try:
        target = parse(uri)
        if target.kind != "model_version":
            return None
        mv = registry.model_version(uri, target.name, version=target.version)
        return _resolved_version(uri, target.kind, mv, store).key
    except (PrefetchError, OSError):
        return None


# -- identify ----------------------------------------------------------------------------------------------
def identify(uri: str, settings: Settings, store: Store) -> Resolved:
    """The key for uri: no network for pinned registry URIs; one origin call (or a fresh ref) for mutable ones."""
    target = parse(uri)
    if target.kind == "model_version":
        return _identify_version(uri, target, store)
    if target.kind == "logged_model":
        identity = {"kind": "logged_model", "tracking": registry.tracking_uri(), "model_id": target.model_id}
        return Resolved(uri, make_key(target.model_id, identity), target.kind, identity, model_id=target.model_id)
    if target.kind == "run":
        identity = {"kind": "run", "tracking": registry.tracking_uri(), "run_id": target.run_id, "path": target.path}
        key = make_key(f"run-{target.run_id[:12]}-{target.path}", identity)
        return Resolved(uri, key, target.kind, identity, run_id=target.run_id)
    if target.kind == "local":
        return _identify_listing(target, settings)  # local listings are free: never a ref
    ref_id = _ref_id({"uri": uri, "registry": registry.registry_uri() if target.registry_kind else None})
    ref = store.read_ref(ref_id)
    if ref and time.time() - ref["resolved_at"] < settings.ref_ttl and store.lookup(ref["key"], touch=False):
        return _from_ref(uri, ref, offline=False)
    try:
        resolved = _identify_mutable(target, settings, store)
    except Unreachable as e:
        if not ref:
            raise
        age = time.time() - ref["resolved_at"]
        note = f"origin unreachable ({e}); using the last known resolution from {age:.0f}s ago"
        return _from_ref(uri, ref, offline=True, note=note)
    store.write_ref(ref_id, {"uri": uri, "key": resolved.key, "kind": resolved.kind, "identity": resolved.identity,
                             "name": resolved.name, "version": resolved.version, "run_id": resolved.run_id,
                             "model_id": resolved.model_id, "storage_uri": resolved.storage_uri,
                             "resolved_at": resolved.resolved_at})
    return resolved


def _from_ref(uri: str, ref: dict, offline: bool, note: str | None = None) -> Resolved:
    return Resolved(uri, ref["key"], ref["kind"], ref.get("identity") or {}, name=ref.get("name"), version=ref.get("version"),
                    run_id=ref.get("run_id"), model_id=ref.get("model_id"), storage_uri=ref.get("storage_uri"),
                    offline=offline, note=note, resolved_at=ref["resolved_at"])


def _identify_mutable(target: Target, settings: Settings, store: Store) -> Resolved:
    if target.kind in ("model_latest", "model_stage", "model_alias"):
        mv = registry.model_version(target.uri, target.name, stage=target.stage, alias=target.alias)
        return _resolved_version(target.uri, target.kind, mv, store)
    return _identify_listing(target, settings)


def _identify_listing(target: Target, settings: Settings) -> Resolved:
    """Storage origins: the key is a hash of the listing (paths, sizes, etags), so new content is a new key."""
    from .sources import open_source

    storage = target.uri
    source = open_source(storage, settings, registry.tracking_uri() if target.kind == "mlflow_artifacts" else None)
    files = tuple(source.list())
    identity = {"kind": target.kind, **source.identity(), "uri": _canonical_storage(target, source),
                "files": [[f.path, f.size, f.etag] for f in files]}
    tail = target.path.rstrip("/").rsplit("/", 1)[-1] or "root"
    slug = {"s3": f"s3-{urlparse(redact_uri(storage)).netloc}-{tail}", "local": f"local-{tail}",
            "mlflow_artifacts": f"artifacts-{tail}"}.get(target.kind, f"{urlparse(storage).scheme}-{tail}")
    return Resolved(target.uri, make_key(slug, identity), target.kind, identity, storage_uri=storage, files=files,
                    source=source)


def _canonical_storage(target: Target, source) -> str:
    if target.kind == "local":
        return str(source.root)
    return target.uri.rstrip("/")


# -- locate --------------------------------------------------------------------------------------------------
def locate(resolved: Resolved, settings: Settings):
    """(source, files, resolved with storage_uri/ids filled) for a miss. Network."""
    from .sources import open_source

    uri = resolved.uri
    extra: dict = {}
    if resolved.kind.startswith("model_"):
        storage = registry.version_storage(uri, resolved.name, resolved.version)
        if not (resolved.run_id or resolved.model_id):
            mv = registry.model_version(uri, resolved.name, version=resolved.version)
            extra = {"run_id": mv["run_id"], "model_id": mv["model_id"]}
    elif resolved.kind == "logged_model":
        lm = registry.logged_model(uri, resolved.model_id)
        storage = lm["storage"]
        extra = {"run_id": lm["run_id"], "name": lm["name"]}
    elif resolved.kind == "run":
        storage = registry.run_storage(uri, resolved.run_id, parse(uri).path)
    else:
        storage = resolved.storage_uri or uri
    source = resolved.source or open_source(storage, settings, registry.tracking_uri())
    files = resolved.files
    if files is None or resolved.storage_uri is None:
        try:
            files = tuple(source.list())
        except PrefetchError as e:
            raise type(e)(f"{e.message} (at {storage})", uri) from None
    return source, files, dataclasses.replace(resolved, storage_uri=storage, files=files, source=source, **extra)


def resolve(uri: str, settings: Settings | None = None) -> Resolved:
    """Public: the immutable identity, storage location and file listing of uri (no bytes are moved)."""
    settings = settings or Settings.load()
    store = Store(settings.cache_dir)
    resolved = identify(uri, settings, store)
    if resolved.offline:
        manifest = store.lookup(resolved.key, touch=False)
        if manifest:
            return dataclasses.replace(resolved, storage_uri=manifest.source, files=tuple(manifest.files))
        return resolved
    _source, _files, resolved = locate(resolved, settings)
    return resolved
