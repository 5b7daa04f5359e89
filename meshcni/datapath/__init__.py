"""Datapath backends: the eBPF programs and their loader, and the iptables interceptor, behind one interface."""
