"""Model files in mlx-lm's shape (each imports only mlx, mlx_lm and the standard library)."""
