"""Allow `python -m maildesk`."""

from maildesk.cli.main import main

raise SystemExit(main())
