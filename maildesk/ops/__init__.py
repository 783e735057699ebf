"""Operations: checks, metrics, credentials and service notifications."""
