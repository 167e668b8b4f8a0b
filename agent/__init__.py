"""migctl agent: one per node; checkpoints, archives volumes, serves files, runs migrations."""
