"""The IMAP connection's look into imaplib, against the rig's real Dovecot server."""

from __future__ import annotations

import time

from rig.dovecot import ImapAccount

from maildesk.ingress.imap import _unread_input

MAIL = b"From: Alice <alice@example.com>\r\nSubject: Test\r\n\r\nBonjour.\r\n"


def test_unread_input_sees_what_imaplib_read_ahead(imap_account: ImapAccount) -> None:
    # The fetcher relies on this look into imaplib's internals; None would mean it went blind.
    with imap_account.client() as imap:
        imap.select_folder("INBOX")
        imap.idle()
        assert _unread_input(imap) is False
        imap.idle_done()
        imap_account.append(MAIL)
        imap.idle()  # Answered with "+ idling" and "* 1 EXISTS".
        # Wherever the EXISTS is by now, socket or buffer, it counts.
        deadline = time.monotonic() + 5
        while not _unread_input(imap) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _unread_input(imap) is True
        assert (1, b"EXISTS") in imap.idle_done()[1]
