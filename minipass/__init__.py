"""minipass: a reference implementation of PaSS (Parallel Speculative Sampling)."""
