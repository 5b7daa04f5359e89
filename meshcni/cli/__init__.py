"""The `meshcni` command line: one click group, sub-groups per part (lab, agent, pods, install-cni, ...)."""
