"""What a model was trained on (its *domain*), recorded in the model file, and what is new in an ML zone.

``training_domain(frames)`` summarises the training frames: the elements, the molecules (Hill formula and,
where a frame holds one molecule, its charge, and the bond graphs it came in, :func:`graph_key`, so that a
tautomer or isomer of a trained formula is still news), the sizes of the ML zones and the most molecules one
zone held.
:func:`potentials.train` stores it as ``metadata["domain"]``; the ML client compares each zone with it at
start-up (:func:`domain_news`) and warns with one line naming what the model has not seen. Molecules in a frame
are the connected components of its covalent bonds (within 1.5 x the sum of covalent radii: hot and displaced
training frames stretch bonds, hydrogen bonds (> 1.6 Å) stay apart). A hydrogen is monovalent: it keeps only its
nearest bonded partner, so a water hydrogen squeezed towards a carboxylate oxygen in a displaced frame does not
merge the two molecules.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

BOND_FACTOR = 1.5          # bonded: closer than this times the sum of the covalent radii (ASE's table)
GRAPH_BOND_FACTOR = 1.3    # tighter, for the bond graph of a training frame (graph_key): at 1.5 a hot or
#                            displaced 5-ring gains 1,3 "bonds" (2.2 A), at 1.2 a stretched O-H breaks; at 1.3
#                            every shipped molecule comes in one graph (checked on stage 11's 3216 frames)
WL_ROUNDS = 3              # Weisfeiler-Lehman rounds of graph_key (3 bonds: enough for ring tautomers)


def formula(numbers) -> str:
    """Hill formula (C first, then H, then the rest alphabetically; no C: all alphabetically)."""
    from ase.data import chemical_symbols

    count = Counter(chemical_symbols[int(z)] for z in np.asarray(numbers).reshape(-1))
    order = (["C", "H"] if "C" in count else []) + sorted(s for s in count if "C" in count and s not in "CH" or
                                                          "C" not in count)
    return "".join(f"{s}{count[s] if count[s] > 1 else ''}" for s in order)


def graph_key(numbers, bonds) -> str:
    """A name for a molecule's bond graph: a Weisfeiler-Lehman hash (elements, ``WL_ROUNDS`` rounds) of the atoms
    ``numbers`` joined by ``bonds`` (pairs of local indices). Isomers and tautomers with one formula (the neutral
    histidines HID and HIE: the same C4H6N2 side chain with the hydrogen on the other ring nitrogen) get
    different keys; the key does not depend on the atom order."""
    import hashlib

    z = [int(v) for v in np.asarray(numbers).reshape(-1)]
    nbrs: list[list[int]] = [[] for _ in z]
    for i, j in bonds:
        nbrs[int(i)].append(int(j))
        nbrs[int(j)].append(int(i))
    label = [str(v) for v in z]
    for _ in range(WL_ROUNDS):
        label = [hashlib.sha1((label[i] + "(" + ",".join(sorted(label[j] for j in nbrs[i])) + ")").encode())
                 .hexdigest()[:16] for i in range(len(z))]
    return hashlib.sha1(" ".join(sorted(label)).encode()).hexdigest()[:12]


def bonds(numbers, positions, factor: float = BOND_FACTOR) -> np.ndarray:
    """The covalent bond matrix (n, n) of bool of atoms at ``positions`` (Å): closer than ``factor`` times the
    sum of the covalent radii, each hydrogen bonded only to its nearest partner."""
    from ase.data import covalent_radii

    z = np.asarray(numbers, dtype=int).reshape(-1)
    x = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    r = covalent_radii[z]
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    near = d < factor * (r[:, None] + r[None])
    np.fill_diagonal(near, False)
    for h in np.nonzero(z == 1)[0]:                     # hydrogen: one bond, to its nearest partner
        partners = np.nonzero(near[h])[0]
        if len(partners) > 1:
            keep = partners[np.argmin(d[h, partners])]
            near[h, :], near[:, h] = False, False
            near[h, keep] = near[keep, h] = True
    return near


def molecules(numbers, positions) -> list[np.ndarray]:
    """Atom indices of each covalently bonded molecule (positions Å), in order of their first atom."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    z = np.asarray(numbers, dtype=int).reshape(-1)
    near = bonds(z, positions)
    i, j = np.nonzero(near)
    _, label = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(len(z), len(z))), directed=False)
    first = {lab: k for k, lab in reversed(list(enumerate(label)))}
    return [np.nonzero(label == lab)[0] for lab in sorted(first, key=first.get)]


def training_domain(frames: list[dict]) -> dict:
    """The ``metadata["domain"]`` record of ``frames`` (dicts with numbers, positions Å, total_charge); its
    ``graphs`` map each formula to the keys of the bond graphs it came in (:func:`graph_key`), read from the
    frames that are not displaced copies (``displaced``: their random displacements of up to 0.15 Å stretch a
    ring bond past the graph threshold now and then, which named spurious graphs for HIP and HIE)."""
    elements, mols, sizes, most = set(), {}, [], 0
    for f in frames:
        z = np.asarray(f["numbers"], dtype=int)
        elements.update(z.tolist())
        near = bonds(z, f["positions"], GRAPH_BOND_FACTOR)
        parts = molecules(z, f["positions"])
        most = max(most, len(parts))
        sizes.append(len(z))
        for p in parts:
            key = (formula(z[p]), int(f["total_charge"]) if len(parts) == 1 else None)
            keys = mols.setdefault(key, set())
            if not f.get("displaced"):          # a displaced copy's stretched bonds name no real graph
                i, j = np.nonzero(np.triu(near[np.ix_(p, p)]))
                keys.add(graph_key(z[p], zip(i, j)))
    graphs: dict[str, set[str]] = {}
    for (m, _), keys in mols.items():
        if keys:
            graphs.setdefault(m, set()).update(keys)
    return {"elements": sorted(elements),
            "molecules": [{"formula": m, "charge": q} for m, q in sorted(mols, key=lambda t: (t[0], str(t[1])))],
            "graphs": {m: sorted(keys) for m, keys in sorted(graphs.items())},
            "zone_atoms": [min(sizes), max(sizes)] if sizes else [0, 0], "ml_molecules": most}


def domain_news(domain: dict, zone: list[tuple], n_atoms: int) -> list[str]:
    """What an ML zone has that ``domain`` does not: molecules (formula, charge) never trained on, a molecule
    whose bond graph (zone items ``(formula, charge, graph_key)``; key None: unknown) the record holds no example
    of (another isomer or tautomer; records without graphs are not checked), and a zone larger than any training
    zone. Empty when the zone is inside the record (or there is no record)."""
    if not domain:
        return []
    seen = {(m["formula"], m["charge"]) for m in domain.get("molecules", [])}
    formulas = {f for f, _ in seen}
    graphs = {f: set(keys) for f, keys in (domain.get("graphs") or {}).items()}
    news = []
    for item in sorted(set(zone), key=lambda t: (t[0], str(t[1:]))):
        f, q, key = (*item, None)[:3]
        if f not in formulas:
            news.append(f"molecule {f}" + (f" (charge {q:+d})" if q is not None else ""))
        elif q is not None and (f, q) not in seen and (f, None) not in seen:
            news.append(f"{f} with charge {q:+d}")
        elif key is not None and f in graphs and key not in graphs[f]:
            news.append(f"{f} bonded differently from every training {f} (another isomer or tautomer)")
    big = int(domain.get("zone_atoms", [0, 0])[1])
    if big and n_atoms > big:
        news.append(f"{n_atoms} ML atoms (training zones: at most {big})")
    return news
