"""Per-backend compilers and the compile pipeline."""
