"""The chain: one row per rule and per boundary, each naming the rule that decides and its action.

Every row starts from the facts of an active customer's new mail (the defaults of MailFacts)
and names what differs; AGENT and FORWARD are the usual starting points of an agent's reply
and of an agent's forward with #new.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from maildesk.rules.chain import CHAIN, Action, MailFacts, decide

A = Action
# An authenticated agent's reply to a reply address signed for them, on a ticket they may see.
AGENT: dict[str, Any] = {"sender_kind": "agent", "authenticated": True,
                         "agent_signed_ticket": True}
# An authenticated agent's forward with #new to the plain desk address.
FORWARD: dict[str, Any] = {"sender_kind": "agent", "authenticated": True, "has_commands": True,
                           "is_forward_new": True, "forwarded_sender_is_account": True}
# A customer's reply that routing matched to one of their tickets.
REPLY: dict[str, Any] = {"route_found": True, "ticket_status": "open", "reopen": "add"}

ROWS = [
    # Every mail, whoever sent it.
    ("oversize", {"oversize": True}, "oversize", A.QUARANTINE),
    ("oversize-before-everything", {"oversize": True, "bounce": True, **AGENT}, "oversize",
     A.QUARANTINE),
    ("oversize-before-malformed", {"oversize": True, "malformed": "x"}, "oversize",
     A.QUARANTINE),
    ("malformed", {"malformed": "no From header"}, "malformed", A.QUARANTINE),
    ("malformed-before-the-desk", {"malformed": "x", "from_desk_itself": True}, "malformed",
     A.QUARANTINE),
    ("desk-itself", {"from_desk_itself": True}, "desk-itself", A.KEEP_QUIET),
    ("desk-itself-before-a-bounce", {"from_desk_itself": True, "bounce": True}, "desk-itself",
     A.KEEP_QUIET),
    ("bounce", {"bounce": True}, "bounce", A.RECORD_BOUNCE),
    ("bounce-from-a-stranger", {"bounce": True, "sender_kind": "unknown",
                                "automatic": "daemon-sender"}, "bounce", A.RECORD_BOUNCE),
    ("bounce-before-an-ambiguous-from", {"bounce": True, "from_problem": "two"}, "bounce",
     A.RECORD_BOUNCE),
    ("ambiguous-sender", {"from_problem": "From has more than one address"},
     "ambiguous-sender", A.QUARANTINE),
    ("ambiguous-sender-even-for-an-agent", {"from_problem": "x", **AGENT}, "ambiguous-sender",
     A.QUARANTINE),
    # An agent's mail.
    ("ambiguous-sender-before-agent-automatic", {**AGENT, "from_problem": "x",
                                                 "automatic": "list"},
     "ambiguous-sender", A.QUARANTINE),
    ("agent-automatic", {**AGENT, "automatic": "auto-submitted", "quiet": True},
     "agent-automatic", A.KEEP_QUIET),
    ("agent-automatic-not-quiet", {**AGENT, "automatic": "list"}, "agent-automatic",
     A.KEEP_QUIET),
    ("agent-automatic-before-unauthenticated", {**AGENT, "automatic": "list",
                                                "authenticated": False},
     "agent-automatic", A.KEEP_QUIET),
    ("agent-unauthenticated", {**AGENT, "authenticated": False}, "agent-unauthenticated",
     A.REFUSE_AGENT),
    ("agent-unauthenticated-forward", {**FORWARD, "authenticated": False},
     "agent-unauthenticated", A.REFUSE_AGENT),
    ("agent-unauthenticated-before-forward-errors", {
        **FORWARD, "authenticated": False, "has_commands": False, "command_errors": True
    }, "agent-unauthenticated", A.REFUSE_AGENT),
    # The error reply goes to the agent's own address, as a refusal would.
    ("forward-command-errors-without-trust", {
        **FORWARD, "authenticated": None, "has_commands": False, "command_errors": True
    }, "forward-command-errors", A.COMMAND_ERRORS),
    ("forward-unauthenticated-before-us-restricted", {
        **FORWARD, "authenticated": None, "agent_may_see_ticket": False
    }, "forward-unauthenticated", A.REFUSE_AGENT),
    ("forward-command-errors", {**FORWARD, "has_commands": False, "command_errors": True},
     "forward-command-errors", A.COMMAND_ERRORS),
    ("forward-unauthenticated-without-trust", {**FORWARD, "authenticated": None},
     "forward-unauthenticated", A.REFUSE_AGENT),
    ("forward-us-restricted", {**FORWARD, "agent_may_see_ticket": False},
     "forward-us-restricted", A.REFUSE_FORWARD),
    ("forward-new", FORWARD, "forward-new", A.FORWARD_OPEN),
    ("forward-new-needs-no-signed-address", {**FORWARD, "agent_signed_ticket": False},
     "forward-new", A.FORWARD_OPEN),
    ("forward-new-on-a-signed-reply", {**FORWARD, "agent_signed_ticket": True},
     "forward-new", A.FORWARD_OPEN),
    ("forward-of-a-stranger", {**FORWARD, "forwarded_sender_is_account": False},
     "forward-refused", A.REFUSE_FORWARD),
    ("agent-unsigned", {**AGENT, "agent_signed_ticket": False}, "agent-unsigned",
     A.REFUSE_AGENT),
    ("agent-unsigned-without-trust", {**AGENT, "agent_signed_ticket": False,
                                      "authenticated": None}, "agent-unsigned", A.REFUSE_AGENT),
    ("agent-unsigned-commands", {**AGENT, "agent_signed_ticket": False, "has_commands": True},
     "agent-unsigned", A.REFUSE_AGENT),
    ("agent-unsigned-before-command-errors", {**AGENT, "agent_signed_ticket": False,
                                              "command_errors": True},
     "agent-unsigned", A.REFUSE_AGENT),
    ("agent-unsigned-before-us-restricted", {**AGENT, "agent_signed_ticket": False,
                                             "agent_may_see_ticket": False},
     "agent-unsigned", A.REFUSE_AGENT),
    ("agent-us-restricted-before-command-errors", {**AGENT, "agent_may_see_ticket": False,
                                                   "command_errors": True},
     "agent-us-restricted", A.REFUSE_AGENT),
    ("agent-us-restricted", {**AGENT, "agent_may_see_ticket": False}, "agent-us-restricted",
     A.REFUSE_AGENT),
    ("agent-us-restricted-before-commands", {**AGENT, "agent_may_see_ticket": False,
                                             "has_commands": True},
     "agent-us-restricted", A.REFUSE_AGENT),
    ("agent-command-errors", {**AGENT, "command_errors": True}, "agent-command-errors",
     A.COMMAND_ERRORS),
    ("agent-command-errors-before-a-note", {**AGENT, "command_errors": True, "note": True},
     "agent-command-errors", A.COMMAND_ERRORS),
    ("agent-note", {**AGENT, "has_commands": True, "note": True}, "agent-note", A.ADD_NOTE),
    ("agent-note-on-an-unsigned-reply", {**AGENT, "has_commands": True, "note": True,
                                         "agent_signed_ticket": False},
     "agent-unsigned", A.REFUSE_AGENT),
    ("agent-commands", {**AGENT, "has_commands": True}, "agent-commands", A.APPLY_COMMANDS),
    ("agent-answer", AGENT, "agent-answer", A.ADD_ANSWER),
    ("agent-answer-without-trust", {**AGENT, "authenticated": None}, "agent-answer",
     A.ADD_ANSWER),
    # A stranger's mail.
    ("stranger-automatic", {"sender_kind": "unknown", "automatic": "noreply-sender"},
     "stranger-automatic", A.QUARANTINE),
    ("stranger-quiet-automatic", {"sender_kind": "unknown", "automatic": "auto-submitted",
                                  "quiet": True}, "stranger-automatic", A.QUARANTINE),
    ("stranger-unauthenticated", {"sender_kind": "unknown", "authenticated": False},
     "stranger-unauthenticated", A.QUARANTINE),
    ("stranger-automatic-before-unauthenticated", {"sender_kind": "unknown",
                                                   "automatic": "list", "authenticated": False},
     "stranger-automatic", A.QUARANTINE),
    ("stranger", {"sender_kind": "unknown"}, "stranger", A.ANSWER_STRANGER),
    ("stranger-authenticated", {"sender_kind": "unknown", "authenticated": True}, "stranger",
     A.ANSWER_STRANGER),
    ("stranger-deactivated", {"sender_kind": "deactivated"}, "stranger", A.ANSWER_STRANGER),
    ("stranger-deactivated-automatic", {"sender_kind": "deactivated", "automatic": "list"},
     "stranger-automatic", A.QUARANTINE),
    ("stranger-forward-facts-mean-nothing", {"sender_kind": "unknown", "is_forward_new": True},
     "stranger", A.ANSWER_STRANGER),
    # A customer's mail.
    ("automatic-reply", {"automatic": "auto-submitted", "quiet": True}, "automatic-reply",
     A.KEEP_QUIET),
    ("automatic-reply-on-a-ticket", {**REPLY, "automatic": "vendor-autoreply", "quiet": True},
     "automatic-reply", A.KEEP_QUIET),
    ("automatic-sender", {"automatic": "list"}, "automatic-sender", A.QUARANTINE),
    ("automatic-sender-before-unauthenticated", {"automatic": "list", "authenticated": False},
     "automatic-sender", A.QUARANTINE),
    ("customer-unauthenticated", {"authenticated": False}, "customer-unauthenticated",
     A.QUARANTINE),
    ("customer-unauthenticated-reply", {**REPLY, "authenticated": False},
     "customer-unauthenticated", A.QUARANTINE),
    ("customer-unauthenticated-before-close", {**REPLY, "has_commands": True,
                                               "authenticated": False},
     "customer-unauthenticated", A.QUARANTINE),
    ("customer-close-of-a-long-closed-ticket", {**REPLY, "has_commands": True,
                                                "ticket_status": "closed", "reopen": "new"},
     "customer-close", A.APPLY_COMMANDS),
    ("customer-close", {**REPLY, "has_commands": True}, "customer-close", A.APPLY_COMMANDS),
    ("customer-close-of-a-solved-ticket-does-not-reopen", {
        **REPLY, "has_commands": True, "ticket_status": "solved", "reopen": "reopen"
    }, "customer-close", A.APPLY_COMMANDS),
    ("customer-close-without-a-ticket-opens-one", {"has_commands": True},
     "customer-new-ticket", A.OPEN_TICKET),
    ("customer-new-after-closed", {**REPLY, "ticket_status": "closed", "reopen": "new"},
     "customer-new-after-closed", A.OPEN_FOLLOW_UP_TICKET),
    ("customer-new-after-solved", {**REPLY, "ticket_status": "solved", "reopen": "new"},
     "customer-new-after-closed", A.OPEN_FOLLOW_UP_TICKET),
    ("customer-reopen-closed", {**REPLY, "ticket_status": "closed", "reopen": "reopen"},
     "customer-reopen", A.REOPEN_TICKET),
    ("customer-reopen-solved", {**REPLY, "ticket_status": "solved", "reopen": "reopen"},
     "customer-reopen", A.REOPEN_TICKET),
    ("customer-reopen-when-the-window-is-unknown", {**REPLY, "ticket_status": "closed",
                                                    "reopen": None},
     "customer-reopen", A.REOPEN_TICKET),
    ("customer-follow-up", REPLY, "customer-follow-up", A.ADD_FOLLOWUP),
    ("customer-follow-up-on-pending", {**REPLY, "ticket_status": "pending"},
     "customer-follow-up", A.ADD_FOLLOWUP),
    ("customer-follow-up-without-trust", {**REPLY, "authenticated": None},
     "customer-follow-up", A.ADD_FOLLOWUP),
    ("customer-follow-up-authenticated", {**REPLY, "authenticated": True},
     "customer-follow-up", A.ADD_FOLLOWUP),
    ("customer-new-ticket", {}, "customer-new-ticket", A.OPEN_TICKET),
    ("customer-new-ticket-ignores-agent-facts", {"agent_signed_ticket": True, "note": True,
                                                 "is_forward_new": True},
     "customer-new-ticket", A.OPEN_TICKET),
    ("customer-status-without-a-route", {"ticket_status": "closed", "reopen": "new"},
     "customer-new-ticket", A.OPEN_TICKET),
    # A sender of no kind that the chain knows: the last rule holds it.
    ("no-rule", {"sender_kind": "robot"}, "no-rule", A.QUARANTINE),
]


def test_the_table_has_forty_rows_and_a_row_for_every_rule() -> None:
    assert len(ROWS) >= 40
    assert len({row[0] for row in ROWS}) == len(ROWS)
    assert {rule.name for rule in CHAIN} <= {row[2] for row in ROWS}


def test_rule_names_are_unique_and_the_last_rule_always_holds() -> None:
    assert len({rule.name for rule in CHAIN}) == len(CHAIN)
    assert CHAIN[-1].check(MailFacts(oversize=True))
    assert CHAIN[-1].check(MailFacts(sender_kind="agent"))


@pytest.mark.parametrize(("facts", "rule", "action"), [row[1:] for row in ROWS],
                         ids=[row[0] for row in ROWS])
def test_the_deciding_rule(facts: dict[str, Any], rule: str, action: Action) -> None:
    decision = decide(MailFacts(**facts))
    assert (decision.rule.name, decision.action) == (rule, action)


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        ({"malformed": "no From header"}, "malformed: no From header"),
        ({"from_desk_itself": True}, "sent by the desk itself"),
        ({"from_problem": "From has more than one address"},
         "ambiguous sender: From has more than one address"),
        ({**AGENT, "automatic": "list"}, "automatic: list"),
        ({**AGENT, "authenticated": False, "auth_reason": "dmarc=fail"},
         "agent mail not authenticated: dmarc=fail"),
        ({**AGENT, "agent_signed_ticket": False}, "agent mail without a signed reply address"),
        ({**AGENT, "agent_may_see_ticket": False},
         "US agent on a company without after-hours support"),
        ({"sender_kind": "unknown"}, "unknown sender"),
        ({"sender_kind": "deactivated", "automatic": "list"}, "account deactivated"),
        ({"automatic": "auto-submitted", "quiet": True}, "automatic: auto-submitted"),
        ({"automatic": "noreply-sender"}, "automatic sender: noreply-sender"),
        ({"authenticated": False, "auth_reason": "dmarc=fail"}, "dmarc=fail"),
        # Without a reason of its own, the rule's description stands.
        ({"authenticated": False}, "a customer's mail that the trusted MTA does not vouch for"),
        ({**REPLY, "ticket_status": "solved", "reopen": "reopen"}, "reopens a solved ticket"),
        ({**REPLY, "ticket_status": "closed", "reopen": "new"}, "follows a closed ticket"),
    ],
)
def test_the_reason_that_the_mail_records(facts: dict[str, Any], reason: str) -> None:
    # Today's pipeline records these words: the chain keeps them.
    assert decide(MailFacts(**facts)).reason == reason


def test_facts_are_frozen_plain_values() -> None:
    facts = MailFacts()
    with pytest.raises(dataclasses.FrozenInstanceError):
        facts.bounce = True  # type: ignore[misc]
    assert all(
        isinstance(getattr(facts, f.name), (bool, str, type(None)))
        for f in dataclasses.fields(facts)
    )
