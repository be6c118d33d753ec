"""Redaction of credentials from text that the operator copies out of pods (pure).

A trainer or sampling-server container's termination message is its log tail when it crashes
(`FallbackToLogsOnError`), and the operator copies it into the resource's status and events, which more people may
read than the Secrets the pods use. The operator cannot read those Secrets (its RBAC has no `get` on secrets, and
it gains none for this), so it cannot remove their exact values; it removes what credentials look like instead:
AWS access key ids and secret keys, session tokens, bearer tokens and JWTs (ServiceAccount tokens), URL passwords
and `password=`/`token=`-style assignments. A secret that looks like none of these is not found (docs/security.md).
"""

from __future__ import annotations

import re
from typing import Final

REDACTED: Final = "[REDACTED]"

# (pattern, replacement): a replacement keeps the name of what was removed (group 1) where there is one.
_PATTERNS: Final = (
    # A key name (aws_secret_access_key, AWS_SESSION_TOKEN, SecretAccessKey, "password", api_key, ...) and the
    # value after it (= or :, quoted or not).
    (
        re.compile(
            r"""(?ix)
            (?<![a-z0-9])
            (
              (?:aws_?)?(?:secret_?access_?key|session_?token|security_?token)
              | password | passwd | secret | api_?key | access_?token | refresh_?token | client_?secret | token
            )
            (["']?\s*[:=]\s*["']?)
            ([^\s"',;}&]+)
            """
        ),
        rf"\1\2{REDACTED}",
    ),
    # AWS access key ids (long-term AKIA, temporary ASIA, and the other documented prefixes).
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}\b"), REDACTED),
    # Bearer and Basic credentials (an Authorization header, a curl command line).
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9\-._~+/]+=*"), rf"\1\2{REDACTED}"),
    # JWTs, such as ServiceAccount tokens: three base64url parts, the first two JSON objects ("eyJ").
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    # user:password@ in a URL.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@"), rf"\1{REDACTED}@"),
    # A 40-character AWS secret access key on its own, next to an access key id that was just redacted.
    (re.compile(rf"({re.escape(REDACTED)}[\s,:;/]+)[A-Za-z0-9/+]{{40}}(?![A-Za-z0-9/+])"), rf"\1{REDACTED}"),
)


def redact(text: str) -> str:
    """`text` with everything that looks like a credential replaced by [REDACTED]."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
