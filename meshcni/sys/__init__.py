"""Thin wrappers over the system calls meshcni makes (bpf, cgroup v2, netns, processes, iptables).

Every kernel interaction lives below this package and raises the domain errors of `meshcni.sys.errors`, so
the rest of the code never parses errno values or tool output itself.
"""
