"""Pure torch models: no ray, no deepspeed (a test enforces it)."""
