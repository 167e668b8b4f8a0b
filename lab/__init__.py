"""The lab and the tools that measure migctl, apart from the product: the test nodes (network
namespaces with their own engines, `nodes`), their links (`net`), the workloads, the seed's
method that migctl is compared with, and the evaluation (`migctl bench`). They drive engines
through their own code or through the agents; `migctl lab` and `migctl bench` are theirs.
The compose lab's files are in compose/."""
