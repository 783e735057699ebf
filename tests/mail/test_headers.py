"""The cached header registry: a class per mapped class, headers read as the standard reads them."""

from __future__ import annotations

from email.headerregistry import HeaderRegistry

from maildesk.mail.headers import CachedHeaderRegistry


def test_each_header_class_is_made_once_whatever_the_names() -> None:
    registry = CachedHeaderRegistry()
    assert registry["To"] is registry["to"] is registry["Cc"]  # All address lists.
    assert registry["Subject"] is not registry["To"]
    for number in range(1000):  # A hostile mail's made-up names share the default class.
        assert registry[f"X-Made-Up-{number}"] is registry["X-Other"]
    assert len(registry._made) == 3
    # The standard registry makes a new class each time: what the cache saves.
    assert HeaderRegistry()["To"] is not HeaderRegistry()["To"]


def test_headers_are_read_as_the_standard_registry_reads_them() -> None:
    fields = {
        "To": "Claire Dupont <claire.dupont@client.example>, support@desk.example",
        "Subject": "=?utf-8?q?R=C3=A9ponse?= au ticket",
        "Date": "Mon, 07 Dec 2026 10:00:00 +0100",
        "Message-ID": "<a1@client.example>",
        "Content-Type": 'text/plain; charset="utf-8"',
    }
    cached, standard = CachedHeaderRegistry(), HeaderRegistry()
    for name, value in fields.items():
        got, expected = cached(name, value), standard(name, value)
        assert (str(got), type(got).__mro__[1:]) == (str(expected), type(expected).__mro__[1:])
    assert [a.addr_spec for a in cached("To", fields["To"]).addresses] == [
        "claire.dupont@client.example", "support@desk.example",
    ]  # fmt: skip
