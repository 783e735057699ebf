"""Authentication: does the trusted MTA vouch for the From domain of a mail?

The MTA that receives the desk's mail checks SPF, DKIM and DMARC and records its verdicts in an
Authentication-Results header (RFC 8601) that it prepends, under its own authserv-id. Only the
topmost header carrying the configured authserv-id counts: anything below it, or under another
id, may have been written by the sender. A From is authenticated by `dmarc=pass` for exactly
the From domain, or by `dkim=pass` whose signing domain is aligned with it (the same domain, or
the same organisational domain by the Public Suffix List). SPF alone proves only the envelope
sender, which nobody reads, so it never authenticates a From.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import authres
from publicsuffixlist import PublicSuffixList

from maildesk.mail.message import ParsedMail

# An RFC 2047 encoded word has no place in this header (RFC 8601 section 2.2); a decoder
# that honoured one would let a sender write any verdict.
_ENCODED_WORD = re.compile(r"=\?[^?]*\?[bBqQ]\?")
# A header longer than this is no MTA's: refusing it bounds the parser's work.
_MAX_HEADER_CHARS = 8192


@dataclass(frozen=True)
class AuthVerdict:
    """Whether the trusted MTA vouches for the From domain, and the evidence or its absence."""

    authenticated: bool
    reason: str


@functools.cache
def _suffix_list() -> PublicSuffixList:
    # Loading the bundled list takes a few milliseconds; once per process is enough.
    return PublicSuffixList()


def organisational_domain(domain: str) -> str | None:
    """The registrable domain of `domain` (client.co.uk for mail.client.co.uk), or None."""
    found = _suffix_list().privatesuffix(domain.lower().rstrip("."))
    return found.lower() if found else None


def aligned(signing_domain: str, from_domain: str) -> bool:
    """Relaxed DMARC alignment: the same organisational domain, never a suffix or look-alike."""
    a, b = signing_domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if a == b:
        return True
    org_a, org_b = organisational_domain(a), organisational_domain(b)
    return org_a is not None and org_a == org_b


def _raw_values(mail: ParsedMail) -> list[str]:
    """Every Authentication-Results value as received, topmost first, never decoded."""
    values = []
    for name, value in mail.message.raw_items():
        if name.lower() == "authentication-results":
            values.append(" ".join(str(value).split()))
    return values


def _parse(value: str) -> Any:
    if len(value) > _MAX_HEADER_CHARS or _ENCODED_WORD.search(value):
        return None
    try:
        return authres.AuthenticationResultsHeader.parse_value(value)
    except Exception:  # authres raises SyntaxError and others on malformed headers.
        return None


def _property(result: Any, ptype: str, name: str) -> str | None:
    for prop in result.properties:
        if prop.type.lower() == ptype and prop.name.lower() == name:
            return str(prop.value).strip().strip('"').lower()
    return None


def authenticate_from(mail: ParsedMail, trusted_authserv_id: str | None) -> AuthVerdict | None:
    """The trusted MTA's verdict on the From domain; None when no authserv-id is trusted."""
    if not trusted_authserv_id:
        return None
    trusted = trusted_authserv_id.strip().lower()
    domain = mail.from_address.rpartition("@")[2].lower()
    header = None
    for value in _raw_values(mail):
        authserv = value.split(";", 1)[0].split()
        if authserv and authserv[0].lower() == trusted:
            # The topmost header under our id is the MTA's own, even when it does not parse:
            # a header below it cannot stand in for it.
            header = _parse(value)
            if header is None:
                return AuthVerdict(False, f"unreadable Authentication-Results from {trusted}")
            break
    if header is None:
        return AuthVerdict(False, f"no Authentication-Results from {trusted}")
    results = [(r, r.method.lower(), str(r.result).lower()) for r in header.results]
    for _result, method, verdict in results:
        # A DMARC verdict other than pass is final: an aligned DKIM pass would have made it pass.
        if method == "dmarc" and verdict != "pass":
            return AuthVerdict(False, f"dmarc={verdict}")
    for result, method, verdict in results:
        if method == "dmarc" and verdict == "pass":
            if _property(result, "header", "from") == domain:
                return AuthVerdict(True, "dmarc=pass")
        if method == "dkim" and verdict == "pass":
            signer = _property(result, "header", "d") or _domain_of(
                _property(result, "header", "i")
            )
            if signer and aligned(signer, domain):
                return AuthVerdict(True, f"dkim=pass aligned ({signer})")
    return AuthVerdict(False, "sender not authenticated (no DMARC pass or aligned DKIM pass)")


def _domain_of(identity: str | None) -> str | None:
    if not identity:
        return None
    return identity.rpartition("@")[2] or None
