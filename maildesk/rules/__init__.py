"""Rules: pure decisions over a parsed mail and the facts looked up for it."""
