"""`python -m agentapi_persist`."""

from .cli import main

raise SystemExit(main())
