"""The recurrent stack over time: ``stack`` (workspaces, lengths, directions, truncation lanes, graph capture),
``recompute`` (segment recomputation for long sequences), ``memory`` (the memory estimate), ``losses`` (chunked
output losses) and ``pullback`` (the stack's vector–Jacobian product, on which every head and the torch module
build). Import the submodules themselves: this package re-exports nothing.
"""
