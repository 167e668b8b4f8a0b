"""What the client and the agent share: one error hierarchy (each error a gRPC status, with the
node that answered when an agent did), an identity's TLS files, and channels to an agent."""
