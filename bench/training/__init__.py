"""`melt-bench convert`: MELT's two-phase post-training from Ouro, on one process or many."""
