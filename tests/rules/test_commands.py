"""Commands: the lines at the top of a reply, in English and French, all or nothing."""

from __future__ import annotations

import pytest

from maildesk.rules.commands import MAX_COMMANDS, WORDS, read_commands, valid_commands_help


def agent(text: str) -> list[tuple[str, str | None]]:
    """The (name, argument) pairs of an agent's reply, asserting that nothing was refused."""
    block = read_commands(text, sender="agent")
    assert block.errors == []
    return [(command.name, command.argument) for command in block.commands]


@pytest.mark.parametrize(
    ("line", "name", "argument"),
    [
        ("#close", "close", None),
        ("#fermer", "close", None),
        ("#clore", "close", None),
        ("#solved", "solved", None),
        ("#resolved", "solved", None),
        ("#résolu", "solved", None),
        ("#resolu", "solved", None),
        ("#pending", "pending", None),
        ("#attente", "pending", None),
        ("#en-attente", "pending", None),
        ("#open", "open", None),
        ("#reopen", "open", None),
        ("#ouvrir", "open", None),
        ("#rouvrir", "open", None),
        ("#assign me", "assign", "me"),
        ("#assign bob@desk.example", "assign", "bob@desk.example"),
        ("#assign <Bob@Desk.Example>", "assign", "Bob@desk.example"),
        ("#assigner moi", "assign", "me"),
        ("#attribuer alice@desk.example", "assign", "alice@desk.example"),
        ("#priority low", "priority", "low"),
        ("#priority normal", "priority", "normal"),
        ("#priority high", "priority", "high"),
        ("#priority urgent", "priority", "urgent"),
        ("#priorité basse", "priority", "low"),
        ("#priorité normale", "priority", "normal"),
        ("#priorite haute", "priority", "high"),
        ("#priorité urgente", "priority", "urgent"),
        ("#note", "note", None),
        ("#note:", "note", None),
        ("#watch", "watch", None),
        ("#suivre", "watch", None),
        ("#merge 123", "merge", "123"),
        ("#merge #123", "merge", "123"),
        ("#merge [#123]", "merge", "123"),
        ("#fusionner 0042", "merge", "42"),
        ("#new", "new", None),
        ("#nouveau", "new", None),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_every_command_and_wording(line: str, name: str, argument: str | None) -> None:
    block = read_commands(f"{line}\nThe rest of the reply.", sender="agent")
    assert block.errors == []
    assert [(c.name, c.argument, c.line) for c in block.commands] == [(name, argument, line)]
    assert block.body == "The rest of the reply."


@pytest.mark.parametrize(
    ("name", "word"), [(name, word) for name, words in WORDS.items() for word in words]
)
def test_every_word_of_the_table_is_read(name: str, word: str) -> None:
    argument = {"assign": "me", "priority": "high", "merge": "7"}.get(name)
    line = f"#{word} {argument}" if argument else f"#{word}"
    assert agent(line) == [(name, argument)]


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("#CLOSE", "close"),
        ("#Fermer", "close"),
        ("  #close  ", "close"),
        ("\t#close", "close"),
        ("\u00a0#close", "close"),
        ("#RÉSOLU", "solved"),
        ("#Re\u0301solu", "solved"),  # Decomposed, as Apple Mail writes accents.
        ("#PRIORITÉ URGENTE", "priority"),
        ("#assign   ME", "assign"),
    ],
)
def test_case_whitespace_and_accents_are_free(line: str, name: str) -> None:
    assert [c.name for c in read_commands(line, sender="agent").commands] == [name]


def test_several_commands_blank_lines_and_the_body() -> None:
    text = "\n\n  #assign me\n\n#Priorité Haute\n#watch\n\nBonjour,\n\n#close\nMerci"
    block = read_commands(text, sender="agent")
    assert [(c.name, c.argument) for c in block.commands] == [
        ("assign", "me"), ("priority", "high"), ("watch", None)
    ]
    # The block ends at the first line that is not a command; a "#close" below it is text.
    assert block.body == "Bonjour,\n\n#close\nMerci"


def test_crlf_text_is_read_and_the_body_has_plain_line_ends() -> None:
    block = read_commands("#close\r\n#note\r\nInterne\r\nFin", sender="agent")
    assert block.names() == ["close", "note"]
    assert block.body == "Interne\nFin"


@pytest.mark.parametrize(
    ("text", "body"),
    [
        ("#1234 is the invoice number", "#1234 is the invoice number"),
        ("# Heading\ntext", "# Heading\ntext"),
        ("Hello #close", "Hello #close"),
        ("", ""),
    ],
)
def test_lines_that_are_not_commands_leave_the_text_alone(text: str, body: str) -> None:
    block = read_commands(text, sender="agent")
    assert (block.commands, block.errors, block.body) == ([], [], body)


@pytest.mark.parametrize(
    ("text", "errors"),
    [
        ("#frobnicate", ['unknown command "#frobnicate"']),
        ("#close now", ["#close takes nothing after it"]),
        ("#priority", ["#priority needs low, normal, high or urgent (basse, normale, haute…)"]),
        ("#priority extreme", [
            "#priority needs low, normal, high or urgent (basse, normale, haute…)"
        ]),
        ("#priorité maximale", [
            "#priorité needs low, normal, high or urgent (basse, normale, haute…)"
        ]),
        ("#assign", ["#assign needs an address, or me (moi)"]),
        ("#assign bob", ["#assign needs an address, or me (moi)"]),
        ("#assign bob@desk.example alice@desk.example", [
            "#assign needs an address, or me (moi)"
        ]),
        ("#assigner Bob <bob@desk.example>", ["#assigner needs an address, or me (moi)"]),
        ("#merge", ["#merge needs a ticket number, such as 123 or [#123]"]),
        ("#merge twelve", ["#merge needs a ticket number, such as 123 or [#123]"]),
        ("#fusionner 12a", ["#fusionner needs a ticket number, such as 123 or [#123]"]),
        ("#close\n#new", ["#new must stand on the first line"]),
        ("#close\n#open", ["#close and #open cannot go together"]),
        ("#solved\n#en-attente", ["#solved and #en-attente cannot go together"]),
        ("#assign me\n#assign bob@desk.example", [
            "#assign me and #assign bob@desk.example cannot go together"
        ]),
        ("#priority low\n#priorité haute", [
            "#priority low and #priorité haute cannot go together"
        ]),
        ("#watch\n#frobnicate\n#priority meh", [
            'unknown command "#frobnicate"',
            "#priority needs low, normal, high or urgent (basse, normale, haute…)",
        ]),
    ],
)
def test_an_unknown_or_malformed_command_refuses_the_whole_block(
    text: str, errors: list[str]
) -> None:
    block = read_commands(text + "\nSecret de l'équipe", sender="agent")
    assert block.commands == []
    assert block.errors == errors
    # Refused or not, no command line is left in what might reach the customer.
    assert block.body == "Secret de l'équipe"


def test_too_many_commands_are_refused() -> None:
    block = read_commands("#watch\n" * (MAX_COMMANDS + 5) + "text", sender="agent")
    assert block.commands == []
    assert block.errors == [f"more than {MAX_COMMANDS} commands"]
    assert block.body == "text"


def test_a_long_line_is_never_a_command() -> None:
    line = "#note " + "x" * 1000
    block = read_commands(line, sender="agent")
    assert (block.commands, block.errors, block.body) == ([], [], line)


@pytest.mark.parametrize(
    "text",
    [
        "#close\n#assign me\n#priority urgent\n#watch\n#note\n\nInternal only",
        "\n#merge [#12]\n#fermer\nInternal only",
        "#frobnicate\n#close\nInternal only",
        "#nouveau\n#priorité haute\n\nInternal only",
    ],
)
def test_command_lines_never_reach_the_body(text: str) -> None:
    block = read_commands(text, sender="agent")
    assert block.body == "Internal only"
    assert "#" not in block.body


def test_a_customer_may_close_with_the_first_line_only() -> None:
    for word in ("#close", "#fermer", "  #Fermer ", "#CLOSE"):
        block = read_commands(f"\n{word}\nMerci, c'est réglé.", sender="customer")
        assert [(c.name, c.argument) for c in block.commands] == [("close", None)]
        assert block.errors == []
        assert block.body == "Merci, c'est réglé."


@pytest.mark.parametrize(
    "text",
    [
        "#1234 est la facture en question",
        "#solved\nMerci",
        "#assign me\nhello",
        "#frobnicate\nhello",
        "#clore\nhello",  # Customers have #close and #fermer only.
        "#close please\nhello",
        "Bonjour,\n#close",
        "#priority urgent\n#close",
    ],
)
def test_any_other_hash_line_of_a_customer_is_text(text: str) -> None:
    block = read_commands(text, sender="customer")
    assert (block.commands, block.errors, block.body) == ([], [], text)


@pytest.mark.parametrize(("locale", "first"), [("en", "Commands"), ("fr", "Commandes"),
                                               ("fr_FR", "Commandes"), ("de", "Commands")])
def test_the_help_lists_both_languages_the_locale_first(locale: str, first: str) -> None:
    help_text = valid_commands_help(locale)
    lines = help_text.split("\n")
    assert len(lines) == 2 and lines[0].startswith(first)
    for word in ("#close", "#solved", "#pending", "#open", "#assign", "#priority", "#note",
                 "#watch", "#merge", "#new", "#fermer", "#résolu", "#attente", "#rouvrir",
                 "#assigner", "#priorité", "#suivre", "#fusionner", "#nouveau"):
        assert word in help_text
