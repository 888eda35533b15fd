"""Real loopback peers that follow the SPEC contract, for tests, demos and integrators.

Each submodule holds one peer (an aiohttp server bound to 127.0.0.1 on a free port) that
answers the way the real one does, records what it received, and has knobs for the failures
worth rehearsing. Import the submodule you need; nothing is imported here.
"""

from __future__ import annotations

__all__: list[str] = []
