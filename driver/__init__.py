"""How a run is driven: the i-PI socket codec and client loop, launching i-PI and clients, the `mlmm` CLI."""
