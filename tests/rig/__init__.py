"""Real-server test rig: throwaway Dovecot, SMTP and PostgreSQL servers."""
