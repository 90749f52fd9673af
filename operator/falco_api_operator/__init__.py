"""The falco-api Kubernetes operator (FalcoRule, FalcoConfig)."""
