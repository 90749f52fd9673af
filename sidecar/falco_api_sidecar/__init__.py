"""The falco-api sidecar: the Falco API gRPC server beside one Falco."""
