"""The node agent: loads (or re-adopts) the pinned datapath, enrols pods on CNI events, and serves the API.

Layout: `core.py` decides (pod lifecycle, modes, the registry of enrolled pods); `registry.py` persists it;
`policy.py`/`kube.py` supply pod annotations; `grpc_api.py` and `cni_http.py` are the two front doors (gRPC
for tools, HTTP+JSON for the CNI plugin); `metrics.py` exports Prometheus counters; `daemon.py` wires it
all together and owns start-up and shutdown.
"""
