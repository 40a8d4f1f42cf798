"""Self-contained Triton kernels. Each file depends on torch and triton only and carries its torch reference."""
