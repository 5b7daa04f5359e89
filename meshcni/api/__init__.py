"""The agent's gRPC API: agent.proto and the Python modules generated from it (scripts/gen-proto.sh)."""
