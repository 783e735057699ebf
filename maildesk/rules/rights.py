"""Rights requests by mail: does a customer's mail ask to exercise a data protection right?

A support desk for HR software reads "droits d'accès", "supprimer", "rectification" and
"RGPD" all day about the product itself, so a word alone proves nothing: a mail counts as a
request only when it names a right in its legal terms (droit à l'effacement, right of access),
or asks for something to be done to the writer's own data (supprimer mes données, delete my
personal data), or invokes the law (RGPD, GDPR, the DPO) about the writer's own data. The
answer is due one month after receipt (GDPR Art. 12(3)).
"""

from __future__ import annotations

import calendar
import re
import unicodedata
from datetime import date

KINDS = ("access", "erasure", "rectification", "objection", "restriction", "portability",
         "generic")

# Whose data: the writer's own, in French and English (accents are removed before matching).
_MINE = (
    r"(?:mes (?:donnees|informations)(?: personnelles| a caractere personnel)?"
    r"|(?:donnees|informations)(?: personnelles| a caractere personnel)? (?:qui )?me concern\w+"
    r"|my (?:personal )?(?:data|information|details)"
    r"|(?:data|information) (?:you (?:hold|have|keep|store) )?(?:about|on|concerning) me)"
)
_DATA = rf"(?:{_MINE}|(?:les |des )?donnees personnelles|personal data)"
_LAW = (r"(?:\brgpd\b|\bgdpr\b|\bdpo\b|delegue a la protection des donnees"
        r"|data protection officer|\bcnil\b|informatique et libertes"
        r"|\barticles? (?:1[5-9]|2[0-2])\b)")

_PATTERNS: dict[str, tuple[str, ...]] = {
    "access": (
        r"\bdroit d'acces\b(?! au\b| aux (?:module|ecran|dossier|fichier|menu|appli))",
        r"\bacces a " + _MINE,
        r"\b(?:copie|communication|liste) (?:de |des |integrale de )?" + _MINE,
        r"\bquelles (?:donnees|informations)(?: personnelles)? (?:vous )?(?:detenez|avez|"
        r"conservez|traitez)",
        r"\bright (?:of|to) access\b",
        r"\b(?:access to|a copy of|copy of) (?:all )?" + _MINE,
        r"\bsubject access request\b", r"\bdsar\b",
        r"\bwhat (?:personal )?(?:data|information) (?:do )?you (?:hold|have|keep|store|process)",
    ),
    "erasure": (
        r"\bdroit (?:a l'effacement|a l'oubli|de suppression)\b",
        r"\b(?:supprim|effac|detrui)\w* (?:de |toutes )?(?:l'ensemble de )?" + _MINE,
        r"\b(?:suppression|effacement|destruction) (?:de |des |complete de |totale de )?"
        r"(?:toutes )?" + _MINE,
        r"\bright to (?:erasure|be forgotten)\b",
        r"\b(?:delet|eras|remov|destroy|purg)\w* (?:all )?(?:of )?" + _MINE,
        r"\b(?:deletion|erasure|removal) of (?:all )?(?:of )?" + _MINE,
    ),
    "rectification": (
        r"\bdroit de rectification\b",
        r"\b(?:rectifi|corrig)\w* " + _MINE,
        r"\brectification (?:de |des )?" + _MINE,
        r"\bright (?:to|of) rectification\b",
        r"\b(?:rectify|correct) " + _MINE,
        r"\brectification of " + _MINE,
    ),
    "objection": (
        r"\bdroit d'opposition\b",
        r"\bm'oppose\w* (?:a |au )(?:l'utilisation |l'usage |le traitement |ce traitement |"
        r"tout traitement )?(?:de |des )?" + _DATA,
        r"\bm'oppose\w* (?:a |au )(?:ce |tout )?traitement\b",
        r"\bopposition (?:au|a tout|a ce) traitement\b",
        r"\bright to object\b",
        r"\bobject(?:ing)? to (?:the |any |this )?(?:use|processing) of " + _DATA,
    ),
    "restriction": (
        r"\bdroit a la limitation\b",
        r"\blimitation (?:du |de ce )traitement\b",
        r"\blimit\w* (?:le traitement|l'utilisation|l'usage) (?:de |des )?" + _DATA,
        r"\bright to restriction\b",
        r"\brestrict\w* (?:the )?(?:processing|use) of " + _DATA,
        r"\brestriction of (?:the )?processing\b",
    ),
    "portability": (
        r"\bdroit a la portabilite\b",
        r"\bportabilite (?:de |des )?" + _MINE,
        r"\bright to (?:data )?portability\b",
        r"\bportability of " + _MINE,
    ),
    "generic": (
        r"\bexercer mes droits\b", r"\bexercise (?:of )?my (?:data protection |privacy |gdpr )?"
        r"rights\b",
        r"\bmes droits (?:rgpd|sur mes donnees)\b", r"\bmy (?:gdpr|data protection) rights\b",
        rf"{_LAW}.{{0,200}}{_MINE}", rf"{_MINE}.{{0,200}}{_LAW}",
    ),
}
_COMPILED = {kind: [re.compile(p, re.DOTALL) for p in patterns]
             for kind, patterns in _PATTERNS.items()}


def _fold(text: str) -> str:
    """Lowercase, without accents, typographic apostrophes as ', whitespace collapsed."""
    decomposed = unicodedata.normalize("NFKD", text.replace("\u2019", "'").replace("\u02bc", "'"))
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(bare.lower().split())


def _own_words(text: str) -> str:
    # Quoted lines and anything below a signature separator are not the writer's words: our
    # own privacy footer, quoted back in a reply, names every right.
    kept = []
    for line in text.splitlines():
        if line.rstrip() == "--":
            break
        if not line.lstrip().startswith(">"):
            kept.append(line)
    return "\n".join(kept)


def rights_request(subject: str, text: str) -> str | None:
    """The kind of right that this mail asks to exercise, or None if it asks none."""
    folded = _fold(f"{subject}\n{_own_words(text)}")
    found: list[tuple[int, int, str]] = []
    for kind in KINDS:
        starts = [m.start() for p in _COMPILED[kind] if (m := p.search(folded)) is not None]
        if starts:
            # The right named first is the one asked for; a specific one beats "generic".
            found.append((int(kind == "generic"), min(starts), kind))
    return min(found)[2] if found else None


def due_date(received: date) -> date:
    """One month after `received`, the last day of the month when it has no such day.

    GDPR Art. 12(3) gives one month; a request of 31 January is due on the last day of
    February, 28 or 29.
    """
    year, month = (received.year + 1, 1) if received.month == 12 else (
        received.year, received.month + 1)
    last = calendar.monthrange(year, month)[1]
    return date(year, month, min(received.day, last))
