"""How the zones meet: ML-zone selection, the MM point-charge embedding, ML–MM Lennard-Jones, energy bookkeeping."""
