"""meshcni: eBPF capture of service-mesh traffic for sidecar proxies, as a CNI chain plugin and node agent."""

__version__ = "0.1.0"
