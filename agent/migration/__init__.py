"""Migration control flow: the phases of the seed's one-iteration pre-copy."""
