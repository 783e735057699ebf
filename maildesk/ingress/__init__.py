"""Ingress: mail comes in by IMAP (fetch) or SMTP/LMTP (listen) and is handed on raw."""
