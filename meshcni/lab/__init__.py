"""The lab: a Kubernetes node played on one machine, as the demo and the test bed of meshcni.

`meshcni lab up` creates pods as network namespaces wired by the real reference CNI plugins (bridge,
host-local, loopback; later the meshcni plugin), starts nginx and an echo server as the app and HAProxy as a
uid-1337 sidecar in each, inside one dedicated cgroup v2 so the eBPF datapath only ever sees lab processes.
State is a JSON file, so `status` and `down` work from a fresh process; `down` removes everything and is
idempotent.
"""
