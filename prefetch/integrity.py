"""Origin-anchored integrity: what the origin says a file's content is, and the check of the bytes against it.

The sha256s in a manifest (each chunk's) are computed by the transfer, from the bytes we received; by themselves they
only prove the bytes did not change on our disk. What ties them to the origin is one of these, the first the facts
allow (plan()):
  "sha256"   a full-object `x-amz-checksum-sha256` the origin stored at upload;
  "crc32c"   an `x-amz-checksum-crc32c` stored at upload, computed here by google-crc32c's C code (a core
             dependency; awscrt when only that is there; neither: the check is not made);
  "crc32"    an `x-amz-checksum-crc32` stored at upload (zlib): what current AWS SDKs (boto3 >= 1.36, so MLflow's
             uploads) store by default;
  "md5"      the S3 ETag: for a single-part upload (32 hex digits, no '-') it is the MD5 of the bytes; for a
             multipart upload ("<hex>-N") it is the MD5 of the parts' MD5s;
  "none"     nothing checkable (an SSE-KMS ETag and no stored checksum, a source without content hashes): the
             file is only self-hashed, and the manifest says so.
A stored CRC comes before the ETag's MD5 because it is as good a check of bytes in transit at an eighth of the
CPU (CRC32 0.16, CRC32C 0.08, MD5 1.29 CPU-s per GiB here), and checking every byte is what a cold fetch spends
its CPU on. A stored checksum is either full-object (of the bytes in order) or, for a multipart upload, COMPOSITE
("<base64>-N": the checksum of the parts' checksums, like the multipart ETag).

A multipart ETag or COMPOSITE checksum is checked over the parts, so the part sizes must be known. They are not
asked for (one HEAD per part) but guessed (guess_part_sizes): the uploader's part size is almost always the
transfer's chunk size or a common default, and a wrong guess does not pass: another split of the bytes gives
other MD5s or CRCs (a CRC matches by chance once in 2^32, the odds of any CRC check). Only when a guessed check
fails does the engine learn the real sizes (one HEAD per part) and check again from disk: a failure with the real
sizes is a corruption. Parts no common size gives are asked before the first GET.

The check runs over the file's bytes in order (prefetch/transfer.py feeds it while it hashes), or, when the parts
are the transfer's chunks, over each part wherever its bytes are (add_part, part_hasher()); it needs no chunk in
memory, and a mismatch means the file is fetched again (then exit 5): a byte flipped in transit is never committed.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import zlib

from .errors import OriginChanged, PrefetchError  # noqa: F401  (OriginChanged: the engine catches it here)

MiB = 1 << 20
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^([0-9a-f]{32})-(\d+)$")
_COMPOSITE = re.compile(r"^([A-Za-z0-9+/=]+)-(\d+)$")
# Part sizes uploaders use, tried after the transfer's own chunk size: s3transfer / aws-cli / MLflow (8 MiB),
# the S3 minimum that rclone and many SDKs use (5 MiB), MinIO's and s5cmd's (16, 50 MiB), and larger round ones.
COMMON_PART_SIZES = tuple(n * MiB for n in (8, 5, 16, 50, 64, 100, 128, 256, 512))


@dataclasses.dataclass(frozen=True)
class OriginFacts:
    """What the origin said about one file's content."""

    etag: str | None = None                    # without quotes
    version_id: str | None = None
    # stored checksums {"sha256"|"crc32c"|"crc32": base64}, a COMPOSITE one as "<base64>-N"
    checksums: dict = dataclasses.field(default_factory=dict)
    part_sizes: tuple[int, ...] | None = None  # a multipart upload's part sizes, when known or guessed
    parts_guessed: bool = False                # part_sizes is guess_part_sizes()'s, not the origin's word

    @property
    def multipart_parts(self) -> int | None:
        m = _MULTIPART_ETAG.match(self.etag or "")
        if m:
            return int(m.group(2))
        for value in self.checksums.values():
            composite = _COMPOSITE.match(value)
            if composite:
                return int(composite.group(2))
        return None


def guess_part_sizes(size: int, parts: int, chunk_bytes: int) -> tuple[int, ...] | None:
    """The split of `size` bytes into `parts` equal parts (the last one shorter) by the first part size that
    gives that count: the transfer's chunk size (then each part is one chunk), else a common uploader default."""
    for part in (chunk_bytes, *COMMON_PART_SIZES):
        if part > 0 and -(-size // part) == parts:
            return (part,) * (parts - 1) + (size - part * (parts - 1),)
    return None


def with_guessed_parts(facts: OriginFacts, size: int, chunk_bytes: int) -> OriginFacts:
    """These facts with guessed part sizes when they name a multipart upload whose parts are not known."""
    parts = facts.multipart_parts
    if not parts or facts.part_sizes is not None:
        return facts
    guess = guess_part_sizes(size, parts, chunk_bytes)
    return dataclasses.replace(facts, part_sizes=guess, parts_guessed=True) if guess else facts


def _crc32c_function():
    """extend(data, crc) -> crc for CRC32C in C code, or None. google-crc32c's pure-Python fallback (what it uses
    when its C extension failed to load) runs at a few MB/s, slower than the download it would check: not used."""
    try:
        import google_crc32c
    except ImportError:
        google_crc32c = None
    if google_crc32c is not None and google_crc32c.implementation == "c":
        extend = google_crc32c.extend
        return lambda data, crc: extend(crc, data if isinstance(data, bytes) else bytes(data))
    try:
        from awscrt import checksums
    except ImportError:
        return None
    return lambda data, crc: checksums.crc32c(bytes(data), crc)


def _crc32_function():
    """crc32(data, crc) -> crc for CRC32 (zlib's polynomial, what S3 stores as x-amz-checksum-crc32): ISA-L's
    (python-isal: carry-less multiply, 0.018 CPU-s per GiB here against zlib's 0.163), else zlib's. Both release
    the GIL and take any buffer (obstore's, a memoryview) without a copy."""
    try:
        from isal.isal_zlib import crc32
    except ImportError:
        return zlib.crc32
    return crc32


_CRC32C = _crc32c_function()
_CRC = {"crc32": _crc32_function(), "crc32c": _CRC32C}


def _parts_known(facts: OriginFacts, parts: int, size: int) -> bool:
    """Whether the facts hold (or guess) the sizes of `parts` parts making up `size` bytes."""
    sizes = facts.part_sizes
    return bool(sizes) and len(sizes) == parts and sum(sizes) == size


def _checkable(facts: OriginFacts, value: str, size: int) -> bool:
    """A stored checksum we can check: a full-object one, or a COMPOSITE one whose parts we know (or guess)."""
    composite = _COMPOSITE.match(value)
    return not composite or _parts_known(facts, int(composite.group(2)), size)


def plan(facts: OriginFacts, size: int) -> str:
    """The cheapest sound check these facts allow for a file of `size` bytes."""
    sha = facts.checksums.get("sha256")
    if sha and not _COMPOSITE.match(sha):
        return "sha256"
    for kind in ("crc32c", "crc32"):
        value = facts.checksums.get(kind)
        if value and _CRC[kind] is not None and _checkable(facts, value, size):
            return kind
    etag = facts.etag or ""
    if _MD5_ETAG.match(etag):
        return "md5"
    parts = _MULTIPART_ETAG.match(etag)
    if parts and _parts_known(facts, int(parts.group(2)), size):
        return "md5"
    return "none"


class PartHash:
    """One part's MD5 or CRC, fed in pieces; digest() is what the multipart value is computed over."""

    def __init__(self, kind: str):
        self.kind = kind
        self._md5 = hashlib.md5() if kind == "md5" else None
        self._crc = 0

    def update(self, data) -> None:
        if self._md5 is not None:
            self._md5.update(data)
        else:
            self._crc = _CRC[self.kind](data, self._crc)

    def digest(self) -> bytes:
        return self._md5.digest() if self._md5 is not None else self._crc.to_bytes(4, "big")


class Checker:
    """Feed a file's bytes in order with update(); mismatch() then names what differed (None: the bytes match)."""

    def __init__(self, facts: OriginFacts, size: int):
        self.facts = facts
        self.check = plan(facts, size)
        self.want = self.facts.etag if self.check == "md5" else self.facts.checksums.get(self.check)
        composite = self.check != "none" and (_MULTIPART_ETAG.match(self.want or "") or _COMPOSITE.match(self.want))
        # over parts: the multipart ETag, or a COMPOSITE checksum; else over the whole file's bytes
        self._parts = list(facts.part_sizes) if composite else None
        if composite or self.check == "none":
            self._whole = None
        else:
            self._whole = hashlib.sha256() if self.check == "sha256" else PartHash(self.check)
        self._part_digests: list[bytes] = []
        self._part = PartHash(self.check) if self._parts else None
        self._part_left = self._parts.pop(0) if self._parts else None
        self._apart: dict[int, bytes] | None = None

    @property
    def part_sizes(self) -> tuple[int, ...] | None:
        """The parts whose digests make the value checked, when the check is over parts."""
        return self.facts.part_sizes if self._part is not None else None

    def part_hasher(self) -> PartHash:
        """A fresh hasher for one part (the engine's workers hash parts that are chunks themselves)."""
        return PartHash(self.check)

    def take_parts_apart(self) -> None:
        """Each part's digest will be handed over by add_part(), computed wherever that part's bytes are and in
        any order (a transfer whose chunks are the parts); update() no longer hashes for the origin check."""
        self._apart = {}

    def add_part(self, index: int, digest: bytes) -> None:
        self._apart[index] = digest

    @property
    def in_order(self) -> bool:
        """Whether this check needs the file's bytes fed in order through update()."""
        return self.check != "none" and self._apart is None

    def sha256_hex(self) -> str | None:
        """The whole file's sha256, when this check computed it (a full-object sha256 the origin stored)."""
        return self._whole.hexdigest() if self.check == "sha256" else None

    def update(self, data) -> None:
        if self.check == "none" or self._apart is not None:
            return
        if self._whole is not None:
            self._whole.update(data)
            return
        view = memoryview(data)
        while view:
            take = min(len(view), self._part_left)
            self._part.update(view[:take])
            view = view[take:]
            self._part_left -= take
            if self._part_left == 0:
                self._part_digests.append(self._part.digest())
                self._part = PartHash(self.check)
                self._part_left = self._parts.pop(0) if self._parts else 0

    def mismatch(self) -> str | None:
        if self.check == "none":
            return None
        if self._whole is not None:
            digest = self._whole.digest()
            got = digest.hex() if self.check == "md5" else base64.b64encode(digest).decode()
        else:
            digests = self._part_digests
            if self._apart is not None:
                digests = [self._apart[i] for i in range(len(self.facts.part_sizes)) if i in self._apart]
            joined = PartHash(self.check)
            joined.update(b"".join(digests))
            value = joined.digest()
            got = f"{value.hex() if self.check == 'md5' else base64.b64encode(value).decode()}-{len(digests)}"
        if got == self.want:
            return None
        guessed = " (part sizes guessed)" if self.facts.parts_guessed and self._whole is None else ""
        return f"{self.check} {got} != origin's {self.want}{guessed}"
