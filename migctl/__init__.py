"""migctl: live migration of stateful Docker containers between edge nodes.

Installed, everything is under this one namespace: `migctl.agent` (a node's agent),
`migctl.client` (the Python API and the `migctl` command), `migctl.proto` (the gRPC contract).
In the repository these are the top-level folders agent/, client/ and proto/, which this
folder links; nothing imports them by their top-level names.
"""
