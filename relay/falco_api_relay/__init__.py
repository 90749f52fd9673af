"""The falco-api relay: one cluster-wide stream merged from every sidecar."""
