"""Object keys, built from ids and hashes only, never from user text.

A key is the same in every backend (``images/<image[:2]>/<submission>/<image>.png`` under an S3
prefix or a local folder), so a prompt can never choose where an object lands or escape its folder.

Image keys lead with a shard, the image id's first two hex digits: S3 takes ~3,500 PUT/s per prefix,
and one large campaign under ``images/<submission>/`` would put all its writes on one; with the shard
they spread over 256 prefixes. The key stays a function of the ids alone (the same image always
lands on the same key: an upload retried or repeated overwrites, never duplicates). Each image's key
is recorded in its row (``storage_key``) and read from there: images stored under the earlier layout
(``images/<submission>/<image>.png``) keep working.
"""

from __future__ import annotations

import re

#: Ids are uuid-like: lowercase hex and dashes, 1..64 characters, starting and ending with hex.
_ID = re.compile(r"[0-9a-f](?:[0-9a-f-]{0,62}[0-9a-f])?")
_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EXT = re.compile(r"[a-z0-9]{1,16}")


def _check(name: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise ValueError(f"{name}={value!r} cannot be used in an object key: it must be {rule}")
    return value


def check_id(name: str, value: object) -> str:
    """Return ``value`` if it is a valid id.

    Raised when it is not: ``ValueError`` naming the field; pass the database id (a uuid), never
    text a user typed.
    """
    return _check(name, value, _ID, "lowercase hex digits and dashes, 1 to 64 characters (a uuid)")


#: Leading characters of the image id that make an image key's shard (16² = 256 prefixes).
IMAGE_SHARD_CHARS = 2


def image_key(submission_id: str, image_id: str) -> str:
    """``images/<image_id[:2]>/<submission_id>/<image_id>.png``; ``ValueError`` if either id is not uuid-like."""
    submission_id = check_id("submission_id", submission_id)
    image_id = check_id("image_id", image_id)
    return f"images/{image_id[:IMAGE_SHARD_CHARS]}/{submission_id}/{image_id}.png"


def content_key(kind: str, sha256: str, ext: str) -> str:
    """``<kind>/<sha256[:2]>/<sha256>.<ext>`` for content-addressed objects (LoRAs, input images).

    Raised as ``ValueError`` when ``kind`` is not a lowercase word, ``sha256`` is not 64 lowercase
    hex digits (``hashlib.sha256(data).hexdigest()``) or ``ext`` is not lowercase letters/digits.
    """
    _check("kind", kind, _KIND, "a lowercase word (letters, digits, '_'; e.g. 'loras')")
    _check("sha256", sha256, _SHA256, "64 lowercase hex digits (hashlib.sha256(data).hexdigest())")
    _check("ext", ext, _EXT, "lowercase letters and digits without a dot (e.g. 'png')")
    return f"{kind}/{sha256[:2]}/{sha256}.{ext}"
