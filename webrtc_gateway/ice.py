"""Which local addresses aiortc offers as ICE host candidates.

aioice offers every interface address except loopback. A gateway (or test, or probe) that must stay on one
interface names its addresses here: ``("127.0.0.1",)`` keeps all media on loopback, which also works on a host whose
only interface is loopback (the browser then needs ``--allow-loopback-in-peer-connection``). aioice reads the list
through a module function and has no setting for it, so this replaces that function for the whole process.
"""

from __future__ import annotations

from collections.abc import Sequence

import aioice.ice

_default = aioice.ice.get_host_addresses


def use_host_addresses(addresses: Sequence[str]) -> None:
    """Offer exactly ``addresses`` as host candidates; an empty list restores aioice's default."""
    if not addresses:
        aioice.ice.get_host_addresses = _default
        return
    chosen = list(addresses)

    def fixed(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = fixed
