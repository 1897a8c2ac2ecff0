"""Console sessions: a signed cookie that names an API key, never holds it.

Signing in presents the key once, through the same check (and failure limits) as X-API-Key.
The cookie then carries the key's id, its organization, a fingerprint of the stored key and a
CSRF secret, signed with the API's session secret (itsdangerous) and dated: HttpOnly, so no
script reads it; SameSite=Strict, so no other site's page sends it; Secure whenever the page
came over TLS. Every request checks the key still exists with the same fingerprint, so revoking
a key ends its sessions as soon as the keys' watch sees it, on every replica: nothing is kept
in one replica's memory.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

COOKIE = "beam_session"
SIGN_IN_COOKIE = "beam_sign_in"  # the sign-in form's CSRF token (double submit, before a session)
PATH = "/console"


@dataclass(frozen=True)
class Session:
    key_id: str
    organization: str
    fingerprint: str
    csrf: str


class Sessions:
    def __init__(self, secret: str, max_age_seconds: int) -> None:
        self.max_age = max_age_seconds
        self._signer = URLSafeTimedSerializer(secret, salt="beam-console-session")

    def issue(self, key_id: str, organization: str, fingerprint: str) -> str:
        return self._signer.dumps({"k": key_id, "o": organization, "f": fingerprint, "c": secrets.token_urlsafe(24)})

    def read(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        try:
            d = self._signer.loads(cookie, max_age=self.max_age)
        except BadSignature:  # SignatureExpired included
            return None
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in "kofc"):
            return None
        return Session(d["k"], d["o"], d["f"], d["c"])


def csrf_ok(expected: str | None, presented: str | None) -> bool:
    return bool(expected) and bool(presented) and hmac.compare_digest(expected.encode(), presented.encode())


def cookie_attributes(secure: bool, max_age: int | None) -> dict:
    return {"httponly": True, "samesite": "strict", "secure": secure, "path": PATH, "max_age": max_age}
