"""The held-out tables of the zones model card (`inputs/models/small_b3lyp_svp_zones.md`, *Held-out test errors*),
in the card's order: the start of each table's heading, the set's short name and its shipped data file under
`inputs/data/` (None for the capped fragments: one file each under `inputs/data/fragments/`).

One list for the two places that read the tables: `tests/bench/zones_card.py` rewrites them for a new model,
`tests/potentials/test_shipped_model.py` checks them against the shipped model."""
from __future__ import annotations

CARD_TABLES = (
    ("Multi-molecule clusters (test split", "clusters", "qmmm_clusters_b3lyp_svp.nc"),
    ("QM zones of 1–6 waters (test split", "zones", "qmmm_zones_b3lyp_svp.nc"),
    ("Ion pairs (test split", "ionpairs", "qmmm_ionpairs_b3lyp_svp.nc"),
    ("Hydrogen-bonded pairs (test split", "hbpairs", "qmmm_hbpairs_b3lyp_svp.nc"),
    ("Capped fragments (test split", "fragments", None),
    ("Single solutes", "solutes", "test_b3lyp_svp.nc"),
)
