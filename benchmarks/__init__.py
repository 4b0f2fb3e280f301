"""Side-by-side measurements of mlxlocal against mlx-lm on the same machine, in one run."""
