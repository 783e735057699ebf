"""Commands: the `#close`, `#assign me`, `#note` … lines at the top of a reply.

An agent works a ticket from their mail client: the first lines of a reply may be commands, one
per line, in English or French wording, in any case, with or without accents. The block ends at
the first line that is neither a command nor blank; the lines of the block are taken out of the
text, so that no command line ever reaches the customer.

The rule of the block is all or nothing: one unknown or malformed command, and the whole block is
refused (`commands` is empty and `errors` says why, one short line each), so that an agent who
mistyped one command never gets half of what they asked for. A customer may only close their
own ticket, with `#close` or `#fermer` on the first line; any other "#…" line of a customer is
ordinary text (customers write "#1234" about an invoice), never an error.

Nothing here touches a database: the pipeline applies the commands that this module reads.
"""

from __future__ import annotations

import email.utils
import re
import unicodedata
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.headerregistry import Address
from typing import Literal

# A line longer than this is prose, not a command; checking the length first bounds the work.
MAX_COMMAND_LINE = 300
# More command lines than this at the top of a reply is no agent's: the block is refused.
MAX_COMMANDS = 20

# Each canonical command and the words that name it, without accents (see `_fold`).
WORDS: dict[str, tuple[str, ...]] = {
    "close": ("close", "fermer", "clore"),
    "solved": ("solved", "resolved", "resolu"),
    "pending": ("pending", "attente", "en-attente"),
    "open": ("open", "reopen", "ouvrir", "rouvrir"),
    "assign": ("assign", "assigner", "attribuer"),
    "priority": ("priority", "priorite"),
    "note": ("note",),
    "watch": ("watch", "suivre"),
    "merge": ("merge", "fusionner"),
    "new": ("new", "nouveau"),
}
_CANONICAL = {word: name for name, words in WORDS.items() for word in words}

# The commands that set the ticket's status: one block may hold one of them at most.
STATUS_COMMANDS = frozenset({"close", "solved", "pending", "open"})
# The commands that may appear once in a block (a second one would contradict the first).
_ONCE = {"assign": "assign", "priority": "priority", "merge": "merge", "new": "new",
         **{name: "status" for name in STATUS_COMMANDS}}
_TAKES_ARGUMENT = frozenset({"assign", "priority", "merge"})

PRIORITIES: dict[str, str] = {
    "low": "low", "normal": "normal", "high": "high", "urgent": "urgent",
    "basse": "low", "normale": "normal", "haute": "high", "urgente": "urgent",
}
_ME = frozenset({"me", "moi"})
# The only command of a customer, and its only two words.
CUSTOMER_CLOSE = frozenset({"close", "fermer"})

# "#" then a letter: "#1234" (an invoice) and "# Title" (a heading) are not command lines.
_COMMAND_LINE = re.compile(r"#(?P<word>[^\W\d_][\w-]*)\s*:?\s*(?P<argument>.*)", re.S)
# A ticket reference: 123, #123 or [#123].
_REFERENCE = re.compile(r"\[?#?(\d{1,12})\]?")

Sender = Literal["agent", "customer"]


@dataclass(frozen=True)
class Command:
    """One command read from a reply: its canonical name, its argument, and the line as written."""

    name: str  # A key of WORDS: "close", "assign", "priority", …
    # "me" or an address for assign, low/normal/high/urgent for priority, a ticket number for
    # merge; None for the others.
    argument: str | None
    line: str


@dataclass(frozen=True)
class CommandBlock:
    """The commands at the top of a reply, the errors that refused them, and the rest of it."""

    commands: list[Command] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    body: str = ""  # The text without the command lines: what the customer may see.

    def names(self) -> list[str]:
        """The canonical names of the commands, in order."""
        return [command.name for command in self.commands]


def _fold(word: str) -> str:
    """Lowercase a word and drop its accents: "Priorité" and "priorite" are the same word."""
    decomposed = unicodedata.normalize("NFKD", word)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _command_line(line: str) -> re.Match[str] | None:
    """The parts of a command line, or None for a line that is not one."""
    stripped = line.strip()
    if len(stripped) > MAX_COMMAND_LINE:
        return None
    # Composed, so that a decomposed accent (Apple Mail writes them so) stays inside its word.
    return _COMMAND_LINE.fullmatch(unicodedata.normalize("NFC", stripped))


def _address(argument: str) -> str | None:
    """The addr-spec that an #assign argument names ("bob@x.example" or "<bob@x.example>")."""
    pairs = email.utils.getaddresses([argument])
    if len(pairs) != 1 or pairs[0][0]:
        return None
    try:
        address = Address(addr_spec=pairs[0][1])
    except (ValueError, IndexError, HeaderParseError):
        return None
    if not address.username or "." not in address.domain:
        return None
    return f"{address.username}@{address.domain.lower()}"


def _read(word: str, argument: str, *, first: bool) -> tuple[str | None, str | None]:
    """Read one command line: (canonical name, argument) or (None, the error)."""
    name = _CANONICAL.get(_fold(word))
    written = f"#{word}"
    if name is None:
        return None, f'unknown command "{written}"'
    if name == "new" and not first:
        return None, f"{written} must stand on the first line"
    if name not in _TAKES_ARGUMENT:
        if argument:
            return None, f"{written} takes nothing after it"
        return name, None
    if name == "assign":
        if _fold(argument) in _ME:
            return name, "me"
        address = _address(argument)
        if address is None:
            return None, f"{written} needs an address, or me (moi)"
        return name, address
    if name == "priority":
        priority = PRIORITIES.get(_fold(argument))
        if priority is None:
            return None, f"{written} needs low, normal, high or urgent (basse, normale, haute…)"
        return name, priority
    reference = _REFERENCE.fullmatch(argument)
    if reference is None:
        return None, f"{written} needs a ticket number, such as 123 or [#123]"
    return name, str(int(reference.group(1)))


def _customer_block(lines: list[str], start: int) -> CommandBlock:
    """A customer's reply: only #close (or #fermer) on the first line is a command."""
    if start < len(lines):
        found = _command_line(lines[start])
        if found and not found["argument"] and _fold(found["word"]) in CUSTOMER_CLOSE:
            command = Command("close", None, lines[start].strip())
            return CommandBlock([command], [], _rest(lines, start + 1))
    return CommandBlock([], [], _rest(lines, 0))


def _rest(lines: list[str], start: int) -> str:
    """The text from line `start` on, without the blank lines that led to it."""
    while start < len(lines) and not lines[start].strip():
        start += 1
    return "\n".join(lines[start:])


def read_commands(text: str, *, sender: Sender) -> CommandBlock:
    """Read the commands at the top of a reply; an unknown or malformed one refuses them all.

    Blank lines before and between the commands are allowed; the block ends at the first other
    line that is not a command. When any command of the block is unknown or malformed, or two
    commands contradict each other, `commands` is empty and `errors` holds one line for each
    problem: nothing of the block may be applied. The command lines are left out of `body`
    either way.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = 0
    while start < len(lines) and not lines[start].strip():
        start += 1
    if sender == "customer":
        return _customer_block(lines, start)
    commands: list[Command] = []
    errors: list[str] = []
    seen: dict[str, str] = {}  # A kind of command given once, and the line that gave it.
    count = 0  # The command lines so far.
    end = start
    for i in range(start, len(lines)):
        if not lines[i].strip():
            continue
        found = _command_line(lines[i])
        if found is None:
            break
        end = i + 1
        count += 1
        if count > MAX_COMMANDS:
            # The lines go on being taken out of the body, but are not read any more.
            errors.append(f"more than {MAX_COMMANDS} commands")
            continue
        line = lines[i].strip()
        name, result = _read(found["word"], found["argument"].strip(), first=i == start)
        if name is None:
            errors.append(result or "")
            continue
        kind = _ONCE.get(name)
        if kind is not None and kind in seen:
            errors.append(f"{seen[kind]} and {line} cannot go together")
            continue
        if kind is not None:
            seen[kind] = line
        commands.append(Command(name, result, line))
    errors = list(dict.fromkeys(errors))
    return CommandBlock([] if errors else commands, errors, _rest(lines, end))


# The help, per language: each command as the agent writes it.
_HELP = {
    "en": ("#close, #solved, #pending, #open, #assign EMAIL or #assign me, "
           "#priority low|normal|high|urgent, #note (the reply stays internal), #watch, "
           "#merge REF; #new on the first line of a forward opens a ticket"),
    "fr": ("#fermer, #résolu, #attente, #rouvrir, #assigner ADRESSE ou #assigner moi, "
           "#priorité basse|normale|haute|urgente, #note (la réponse reste interne), #suivre, "
           "#fusionner REF ; #nouveau en première ligne d'un transfert ouvre un ticket"),
}
_HELP_LEAD = {"en": "Commands, one per line at the top of your reply: ",
              "fr": "Commandes, une par ligne en haut de votre réponse : "}


def valid_commands_help(locale: str) -> str:
    """The valid commands in both languages, the locale's first: one line for each language."""
    first = "fr" if locale.lower().startswith("fr") else "en"
    order = (first, "en" if first == "fr" else "fr")
    return "\n".join(_HELP_LEAD[language] + _HELP[language] for language in order)
