"""The welcome mail: the full privacy notice, queued when an account is created.

The account's data come from the person's company, not from them, so GDPR Art. 14 wants them
told within a month, and at the latest with the first mail we send them. The welcome is written
to the outbox in the transaction that creates the account; should none have been sent (accounts
from before welcomes existed), the Notifier puts the full notice into the first mail instead
(see `Account.notice_sent_at`).
"""

from __future__ import annotations

from sqlmodel import Session

from maildesk.outbound.notify import Notifier
from maildesk.store.models import Account, Company, Outbox, utcnow

KIND = "welcome"


def queue_welcome(session: Session, notifier: Notifier, account: Account) -> Outbox:
    """Queue the welcome with the full notice to `account`, in the caller's transaction."""
    company = session.get(Company, account.company_id)
    if company is None:
        raise ValueError(f"account {account.id} has no company")
    outbox = notifier.compose(
        session, KIND, to_name=account.name, to_address=account.email, locale=account.locale,
        account=account, company=company, us_transfer=company.after_hours, full_notice=True,
    )
    account.notice_sent_at = utcnow()
    session.add(account)
    session.flush()
    return outbox
