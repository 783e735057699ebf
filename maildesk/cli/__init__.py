"""The command line: `maildesk ...`, one module per group of commands."""
