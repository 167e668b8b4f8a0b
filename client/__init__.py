"""migctl client: a thin façade over the Agent gRPC API, and the `migctl` command."""
