"""Mail: the parsed mail and the types every part shares; pure, no database or network."""
