"""Agent-held proxy listeners and their handoff to the proxy (issue 6).

The agent creates a pod's proxy listening sockets inside the pod netns (`listeners.PodListeners`), keeps
them for the pod's lifetime, and passes them to whichever proxy process is current over a per-pod unix socket
with SCM_RIGHTS (`server.HandoffServer`); `meshcni proxy-exec` (`proxy_exec`) is the receiving side in the
sidecar. Because the listening sockets never close while the agent holds them, a proxy can be replaced
gracefully, or crash and be restarted, without one SYN being refused; `upgrade` has the flows.
"""
