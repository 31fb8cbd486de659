"""What needs torch and a model: loading (and 4-bit), capture of the routing, generation, tokens."""
