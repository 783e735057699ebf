"""Texts that more than one part of maildesk says, kept in one place so that they stay equal."""

from __future__ import annotations

# Said once at start-up (and by `maildesk check`) when no MTA's verdicts are trusted.
TRUST_WARNING = (
    "no [security] trusted_authserv_id: agent actions rest on the signed reply address alone, "
    "and no sender's From is checked against SPF, DKIM or DMARC"
)
