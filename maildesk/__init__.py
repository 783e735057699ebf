"""maildesk: a customer support desk that runs over email."""

__version__ = "0.1.0"
