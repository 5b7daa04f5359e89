"""What HAProxy's TCP-to-HTTP upgrade costs a short connection: `cost_per_request.py` with the sidecars' routed
listeners (15103/15108) rendered as HTTP-mode frontends instead of TCP-mode ones.

The capture listeners must accept every protocol on one port, so they run in TCP mode and upgrade to an HTTP
backend by destination port; the `explicit-routed` mode's listeners copy that handling. This what-if keeps
everything else about them (the backends, the app reached at the pod IP from 127.0.0.6, the original
destination looked up on every connection) and only lets the frontend speak HTTP from the start, so
`explicit-routed` here against `explicit-routed` in `cost_per_request.py` is the price of the upgrade. The
variant is rendered by wrapping `meshcni.lab.haproxy.render` in this process only; the lab's own sidecar
configuration is not changed.

    .venv/bin/python bench/upgrade_cost.py [--rounds 3] [--duration 5] [--modes explicit,explicit-routed]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from meshcni.lab import haproxy  # noqa: E402

ROUTED_FRONTENDS = ("routed_out", "routed_in")
# The upgrade's trigger, and what HTTP mode does anyway. The `tcp-request connection` guard stays: it reads
# the connection's destination, which a capture listener must look up whatever its mode.
TCP_ONLY_LINES = ("use_backend", "option tcp-smart-accept")


def http_mode_routed(text: str) -> str:
    """The sidecar configuration with the routed frontends in HTTP mode (their default_backend unchanged)."""
    for frontend in ROUTED_FRONTENDS:
        head = f"\nfrontend {frontend}\n"
        if head not in text:
            raise ValueError(f"the sidecar configuration has no frontend {frontend}")
        before, rest = text.split(head, 1)
        body, after = rest.split("\n\n", 1)
        if "    mode tcp" not in body.splitlines():
            raise ValueError(f"frontend {frontend} is not in TCP mode")
        lines = [line.replace("mode tcp", "mode http") for line in body.splitlines()
                 if not line.strip().startswith(TCP_ONLY_LINES)]
        text = before + head + "\n".join(lines) + "\n\n" + after
    return text


def main() -> int:
    render = haproxy.render
    haproxy.render = lambda spec: http_mode_routed(render(spec))
    import cost_per_request

    if not any(a.startswith("--modes") for a in sys.argv[1:]):
        sys.argv += ["--modes", "explicit,explicit-routed"]
    return cost_per_request.main()


if __name__ == "__main__":
    sys.exit(main())
