"""Origin-anchored integrity: what the origin says a file's content is, and the check of the bytes against it.

The sha256 in a manifest is computed here, from the bytes we received; by itself it only proves the bytes did not
change on our disk. What ties them to the origin is one of these, the first the facts allow (plan()):
  "sha256"   a full-object `x-amz-checksum-sha256` the origin stored at upload;
  "md5"      the S3 ETag: for a single-part upload (32 hex digits, no '-') it is the MD5 of the bytes; for a
             multipart upload ("<hex>-N") it is the MD5 of the parts' MD5s, which we can recompute when we know
             every part's size (HEAD ?partNumber=k);
  "crc32c"   a full-object `x-amz-checksum-crc32c`, computed here by google-crc32c's C code (a core dependency;
             awscrt when only that is there; neither: the check is not made);
  "crc32"    a full-object `x-amz-checksum-crc32` (zlib);
  "none"     nothing checkable (an SSE-KMS ETag, a multipart upload of unknown layout whose stored checksum is
             COMPOSITE or absent, a source without content hashes): the file is only self-hashed, and the
             manifest says so.
The S3 source asks for stored checksums (one HEAD, ChecksumMode=ENABLED) only when the ETag gives no check, and
keeps only full-object ones: a COMPOSITE "<crc>-N" is a checksum of the parts' checksums, not of the bytes.
The check runs over the file's bytes in order (prefetch/transfer.py feeds it while it hashes), or, for a multipart
ETag whose parts are the transfer's chunks, over each part wherever its bytes are (add_part); it needs no chunk in
memory, and a mismatch means the file is fetched again (then exit 5): a byte flipped in transit is never committed.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import zlib

from .errors import OriginChanged, PrefetchError  # noqa: F401  (OriginChanged: the engine catches it here)

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^([0-9a-f]{32})-(\d+)$")
CHECKS = ("sha256", "md5", "crc32c", "crc32", "none")


@dataclasses.dataclass(frozen=True)
class OriginFacts:
    """What the origin said about one file's content."""

    etag: str | None = None                    # without quotes
    version_id: str | None = None
    checksums: dict = dataclasses.field(default_factory=dict)   # full-object {"sha256"|"crc32c"|"crc32": base64}
    part_sizes: tuple[int, ...] | None = None  # a multipart upload's part sizes, when known

    @property
    def multipart_parts(self) -> int | None:
        m = _MULTIPART_ETAG.match(self.etag or "")
        return int(m.group(2)) if m else None


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


_CRC32C = _crc32c_function()


def _crc32c_available() -> bool:
    return _CRC32C is not None


def plan(facts: OriginFacts, size: int) -> str:
    """The strongest check these facts allow for a file of `size` bytes."""
    if "sha256" in facts.checksums:
        return "sha256"
    etag = facts.etag or ""
    if _MD5_ETAG.match(etag):
        return "md5"
    parts = facts.multipart_parts
    if parts and facts.part_sizes and len(facts.part_sizes) == parts and sum(facts.part_sizes) == size:
        return "md5"
    if "crc32c" in facts.checksums and _crc32c_available():
        return "crc32c"
    if "crc32" in facts.checksums:
        return "crc32"
    return "none"


class Checker:
    """Feed a file's bytes in order with update(); mismatch() then names what differed (None: the bytes match)."""

    def __init__(self, facts: OriginFacts, size: int):
        self.facts = facts
        self.check = plan(facts, size)
        self._md5 = hashlib.md5() if self.check == "md5" else None
        self._sha = hashlib.sha256() if self.check == "sha256" else None
        self._crc = 0
        self._parts = list(facts.part_sizes) if self.check == "md5" and facts.multipart_parts else None
        self._part_digests: list[bytes] = []
        self._part_left = self._parts.pop(0) if self._parts else None
        self._apart: dict[int, bytes] | None = None

    @property
    def part_sizes(self) -> tuple[int, ...] | None:
        """The parts whose MD5s make the ETag, when that is the check."""
        return self.facts.part_sizes if self._parts is not None else None

    def take_parts_apart(self) -> None:
        """Each part's MD5 will be handed over by add_part(), computed wherever that part's bytes are and in any
        order (a transfer whose chunks are the parts); update() no longer hashes for the ETag."""
        self._apart = {}

    def add_part(self, index: int, digest: bytes) -> None:
        self._apart[index] = digest

    def update(self, data) -> None:
        if self.check == "none" or self._apart is not None:
            return
        if self._sha is not None:
            self._sha.update(data)
        elif self.check in ("crc32", "crc32c"):
            self._crc = _crc(self.check, data, self._crc)
        elif self._part_left is None:
            self._md5.update(data)
        else:
            view = memoryview(data)
            while view:
                take = min(len(view), self._part_left)
                self._md5.update(view[:take])
                view = view[take:]
                self._part_left -= take
                if self._part_left == 0:
                    self._part_digests.append(self._md5.digest())
                    self._md5 = hashlib.md5()
                    self._part_left = self._parts.pop(0) if self._parts else 0

    def mismatch(self) -> str | None:
        if self.check == "none":
            return None
        if self._sha is not None:
            got, want = base64.b64encode(self._sha.digest()).decode(), self.facts.checksums["sha256"]
        elif self.check in ("crc32", "crc32c"):
            got, want = base64.b64encode(self._crc.to_bytes(4, "big")).decode(), self.facts.checksums[self.check]
        elif self.facts.multipart_parts:
            digests = self._part_digests
            if self._apart is not None:
                digests = [self._apart[i] for i in range(len(self.facts.part_sizes)) if i in self._apart]
            joined = hashlib.md5(b"".join(digests)).hexdigest()
            got, want = f"{joined}-{len(digests)}", self.facts.etag
        else:
            got, want = self._md5.hexdigest(), self.facts.etag
        return None if got == want else f"{self.check} {got} != origin's {want}"


def _crc(kind: str, data, value: int) -> int:
    if kind == "crc32":
        return zlib.crc32(data, value)
    return _CRC32C(data, value)
