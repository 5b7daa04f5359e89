"""The meshcni CNI chain plugin (spec 0.3.1–1.1.0): a thin exec-per-call client of the node agent.

This package must stay light to import: stdlib only, nothing from grpc, pyroute2, bcc or click, because a
runtime execs the plugin for every pod and the ADD budget is p50 <= 150 ms end to end.
"""
