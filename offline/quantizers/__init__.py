"""Block-wise quantizers: each maps a reordered weight and its block bit table to codes."""
