"""What computes energies: the embedding-aware network, its training, QM/MM reference data, the OpenMM engine."""
