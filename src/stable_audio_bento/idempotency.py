"""Idempotency keys of job submissions (the IETF httpapi draft's ``Idempotency-Key`` header): a client that lost the
answer to its POST (a timeout, a dropped connection, a proxy's 502) sends the same request again with the same key
and gets the job the first one created, instead of a second job generating the same audio unseen.

A key is bound to what was asked (the validated fields, and an upload's bytes), so a key sent again with another
request is refused rather than answered with the wrong job. Keys live on the instance that took them, as long as
their job does.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Container
from pathlib import Path

from pydantic import BaseModel

from .protocol import APIError

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
SF_STRING = re.compile(r'"((?:[^"\\]|\\["\\])*)"')  # RFC 8941's only escapes are \" and \\
REPLAYED_HEADERS = {"Idempotent-Replayed": "true"}  # on the answer that returns an existing job (Stripe's name)


def request_fingerprint(request: BaseModel) -> str:
    """What identifies a request: its fields as validated (so defaults written out or left out are the same
    request), uploaded files by their contents (their temporary path differs at every upload). Reads the uploads:
    call it off the event loop."""
    uploads = sorted(name for name, value in vars(request).items() if isinstance(value, Path))
    digest = hashlib.sha256(json.dumps(request.model_dump(mode="json", exclude=set(uploads)), sort_keys=True).encode())
    for name in uploads:
        with open(getattr(request, name), "rb") as upload:
            digest.update(f"\0{name}\0".encode() + hashlib.file_digest(upload, "sha256").digest())
    return digest.hexdigest()


def parse_key(header: str) -> str:
    """The key a header value names. The draft makes the value a structured-field string (RFC 8941: quoted, with
    backslash escapes); clients written for Stripe's API send the key bare. Both are taken: ``"k"`` and ``k`` are
    the same key."""
    key = header
    if len(header) >= 2 and header[0] == header[-1] == '"':
        quoted = SF_STRING.fullmatch(header)
        key = "" if quoted is None else re.sub(r'\\(["\\])', r"\1", quoted[1])  # "": refused below
    if not (1 <= len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable()):
        raise APIError(f"the {HEADER} header must be 1 to {MAX_KEY_LENGTH} printable ASCII characters (a UUID, say), "
                       "bare or as a quoted string", param=HEADER, status=400, code="invalid_idempotency_key")
    return key


class IdempotencyKeys:
    """Keys to the jobs they created. A key is claimed before its job is prepared (an upload's decode, admission),
    so that a copy of the request arriving meanwhile is told to wait rather than creating a second job."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[str, str | None]] = {}  # key -> (request fingerprint, job id; None: being created)

    def claim(self, key: str, fingerprint: str) -> str | None:
        """The id of the job this key created for the same request; None once the key is claimed for a new one
        (then ``bind`` or ``release`` it). ``key`` has passed ``check_key``."""
        if (held := self._keys.get(key)) is None:
            self._keys[key] = (fingerprint, None)
            return None
        held_fingerprint, job_id = held
        if held_fingerprint != fingerprint:
            raise APIError(f"this {HEADER} was sent with a different request; a new request needs a new key",
                           param=HEADER, status=422, code="idempotency_key_reused")
        if job_id is None:
            raise APIError(f"a request with this {HEADER} is still being submitted; ask again in a moment",
                           param=HEADER, status=409, code="idempotency_key_in_use", retry_after=1)
        return job_id

    def bind(self, key: str, job_id: str) -> None:
        self._keys[key] = (self._keys[key][0], job_id)

    def release(self, key: str) -> None:
        """The claimed key made no job (the request was refused or its client left): it may be sent again."""
        self._keys.pop(key, None)

    def free(self, job_id: str) -> None:
        """The job failed in a way its message says to send the request again (its engine restarted under it): the
        key is free for that, rather than answering the failed job until it expires."""
        for key, (_, bound_job) in list(self._keys.items()):
            if bound_job == job_id:
                del self._keys[key]

    def keep_only(self, job_ids: Container[str]) -> None:
        """Forgets the keys of jobs no longer kept; keys still being claimed stay."""
        for key, (_, job_id) in list(self._keys.items()):
            if job_id is not None and job_id not in job_ids:
                del self._keys[key]

    def __len__(self) -> int:
        return len(self._keys)
