"""The data plane: staging areas, file and delta streams, volume archives."""
