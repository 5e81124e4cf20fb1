"""On demand (not part of the test suite): the held-out tables of the zones model card for a new model and the
one it replaces (issue #17; `inputs/models/small_b3lyp_svp_zones.md`, *Held-out test errors*).

Evaluates NEW and OLD (electrostatic embedding, as `mlmm evaluate`) on the test split of every set the card has a
table for: the 3-water clusters, the zones of 1–6 waters, the ion pairs, the hydrogen-bonded pairs, each capped
fragment of `inputs/data/fragments/` and the single solutes. It prints "old -> new" per set (ML forces, energy with
the offset removed, energy) and, with ``--json``, writes every number. With ``--update-card CARD --old-label
"stage N"`` it rewrites the rows of the card's six tables (NEW's columns, OLD's in the last one, whose heading gets
OLD's label). The fragment table gets one row per file of `inputs/data/fragments/` (the droplet fragments first, then
those in DHFR, each by name; a new file gets a row, its formula that of its QM zone). Run on the shipped model and its
predecessor it leaves the card unchanged, which is what `tests/potentials/test_shipped_model.py` checks of the
numbers.

    OMP_NUM_THREADS=2 python tests/bench/zones_card.py data/small_stageN.pt old.pt --json s.json \\
        --update-card inputs/models/small_b3lyp_svp_zones.md --old-label "stage M"
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from zones_card_tables import CARD_TABLES  # noqa: E402

DATA = ROOT / "inputs" / "data"
SETS = {name: f for _, name, f in CARD_TABLES if f}       # set -> shipped data file (the fragments: one file each)
TABLE_ORDER = tuple(name for _, name, _ in CARD_TABLES)   # the card's tables in their order


def card_sets() -> dict[str, Path]:
    sets = {name: DATA / f for name, f in SETS.items()}
    for p in sorted((DATA / "fragments").glob("*.nc")):
        sets["fragment:" + p.stem] = p
    return sets


def evaluate_pair(new: str, old: str) -> dict:
    """{set: {"new"|"old": {zone: metrics}}} on each set's test split (the first embedding scheme of the model)."""
    import torch

    from coupling.schemes import SCHEMES
    from driver.pipeline import evaluated_model
    from potentials.domain import formula
    from potentials.evaluate import evaluate, load_frames, read_gas_energies

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    models = {tag: evaluated_model(path, "cpu") for tag, path in (("new", new), ("old", old))}
    res: dict = {}
    for name, path in card_sets().items():
        frames, gas = load_frames(path, "test"), read_gas_energies(path)
        res[name] = {"formula": formula(frames[0]["numbers"])} if name.startswith("fragment:") else {}
        for tag, (model, names) in models.items():           # names: the model's embedding schemes, first = card's
            out = evaluate(model, frames, "cpu", gas_energy=gas, schemes={names[0]: SCHEMES.get(names[0])()})
            res[name][tag] = next(iter(out.values()))
        a, b = res[name]["old"]["all"], res[name]["new"]["all"]
        print(f"{name:20s} n={b['n']:4d}  F {a['forces']:.3f} -> {b['forces']:.3f}  Eoff "
              f"{a['energy_offset_removed']:.3f} -> {b['energy_offset_removed']:.3f}  E {a['energy']:.3f} -> "
              f"{b['energy']:.3f}", flush=True)
    return res


def fragment_order(name: str) -> tuple[bool, str]:
    """The fragment table's order: the droplet fragments, then those inside DHFR (``DHFR-<residue>``), by name."""
    return name.startswith("DHFR-"), name


def _row(kind: str, first: str, new: dict, old: dict) -> list[str]:
    f3 = "{:.3f}".format
    row = [first, str(new["n"])] + [f3(new[m]) for m in ("energy", "forces", "mm_forces", "dipole",
                                                           "energy_offset_removed")]
    if kind == "solutes":
        row.append(f3(new["e_int"]))
    last = [old["energy"], old["forces"]] + ([] if kind in ("fragments", "solutes") else [old["mm_forces"]])
    return row + [" / ".join(map(f3, last))]


def update_card(text: str, res: dict, old_label: str) -> str:
    """The card with the rows of its six held-out tables rewritten from ``res`` (see the module docstring)."""
    frags = sorted((k.split(":", 1)[1] for k in res if k.startswith("fragment:")), key=fragment_order)
    lines, k, in_table, out = text.split("\n"), -1, False, []
    for line in lines:
        if re.match(r"\| (zone|fragment|solute) ", line):
            k, in_table, header = k + 1, True, line
            out.append(re.sub(r"stage \d+:", old_label + ":", line))
            continue
        in_table = in_table and line.startswith("|")
        if not in_table or line.startswith("|---") or line.startswith("| target"):
            out.append(line)
            if in_table and line.startswith("|---") and TABLE_ORDER[k] == "fragments":   # the rows, from the files
                for name in frags:
                    pair = res["fragment:" + name]
                    row = _row("fragments", f"{name} ({pair['formula']})", pair["new"]["all"], pair["old"]["all"])
                    ncols = header.count("|") - 1              # the cells the table's heading names
                    if len(row) != ncols:
                        raise SystemExit(f"card table has {ncols} columns, expected {len(row)}: {header}")
                    out.append("| " + " | ".join(row) + " |")
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        kind = TABLE_ORDER[k]
        if kind == "fragments":                # written above from the files
            continue
        row = _row(kind, cells[0], res[kind]["new"][cells[0]], res[kind]["old"][cells[0]])
        if len(row) != len(cells):
            raise SystemExit(f"card row has {len(cells)} cells, expected {len(row)}: {line}")
        out.append("| " + " | ".join(row) + " |")
    if k != len(TABLE_ORDER) - 1:
        raise SystemExit(f"found {k + 1} held-out tables in the card, expected {len(TABLE_ORDER)}")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("new")
    ap.add_argument("old")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--update-card", default=None, metavar="CARD", help="rewrite the card's held-out tables")
    ap.add_argument("--old-label", default=None, help='heading of the last column, e.g. "stage 25"')
    args = ap.parse_args(argv)
    if args.update_card and not args.old_label:
        ap.error("--update-card needs --old-label (the heading of the card's last column, e.g. \"stage 25\")")
    res = evaluate_pair(args.new, args.old)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.update_card:
        card = Path(args.update_card)
        card.write_text(update_card(card.read_text(), res, args.old_label))
        print(f"rewrote the held-out tables of {card}")


if __name__ == "__main__":
    main()
