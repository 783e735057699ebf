"""Outbound: render and enqueue maildesk's mails (notify), and drain the outbox (send)."""
