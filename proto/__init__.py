"""The wire contract (migctl.proto) and its generated stubs."""
