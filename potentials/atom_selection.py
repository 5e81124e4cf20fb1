"""Atom selection language over an OpenMM topology (the ML zone is chosen with it).

Grammar (keywords and operators are case-insensitive; values are matched exactly, elements ignore case)::

    expr    := term ("or" term)*
    term    := factor ("and" factor)*
    factor  := "not" factor | "byres" factor | "within" DISTANCE "of" factor | "(" expr ")" | keyword value+
    keyword := resname | resid | index | name | chain | element

* ``resname MOL HOH``: residue names.
* ``resid 3 5 10-12``: residue numbers as written in the structure file (``Residue.id``); ranges inclusive;
  an id with an insertion code (``52A``) matches literally.
* ``index 0-20 25``: 0-based atom indices, ranges inclusive.
* ``name CA CB``, ``chain A``, ``element C N``.
* ``within 0.3 of (resid 27 and name OD1 OD2)``: atoms closer than the distance to any atom of the
  selection (the selection's own atoms included), minimum image in a periodic box. The distance is in nm, or
  in Å with the suffix ``A`` (``3A``); it needs positions (:func:`select` ``positions=``).
* ``byres SEL``: every atom of each residue that has an atom in SEL (whole waters, whole residues).

:func:`select` returns sorted 0-based atom indices. :func:`is_geometric` says whether a selection depends on
positions (``within``): ``mlmm prepare`` resolves it once, on the structure it writes, and keeps the atoms."""
from __future__ import annotations

import re

import numpy as np
from openmm import app, unit

from potentials.core.errors import SetupError

KEYWORDS = ("resname", "resid", "index", "name", "chain", "element")
OPERATORS = ("and", "or", "not", "byres", "within", "of")
_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_RANGE = re.compile(r"^(-?\d+)(?:-(-?\d+))?$")


def is_geometric(expr: str) -> bool:
    """Whether the selection depends on positions (it uses ``within``)."""
    return any(t.lower() == "within" for t in _TOKEN.findall(expr or ""))


def select(topology: app.Topology, expr: str, positions=None, box=None) -> np.ndarray:
    """Resolve a selection string to sorted 0-based atom indices (int64).

    ``positions`` (n, 3) nm and ``box`` (3, 3) nm or None (no periodicity) are needed by ``within`` only; without
    them a selection that uses it is a SetupError. Raises SetupError on a malformed expression (naming the
    offending token) or an empty result (listing the residue names present).
    """
    tokens = _TOKEN.findall(expr)
    if not tokens:
        raise SetupError("empty selection; give e.g. --ml \"resname MOL\"")
    parser = _Parser(tokens, expr, _AtomTable(topology, positions, box))
    mask = parser.parse()
    indices = np.flatnonzero(mask).astype(np.int64)
    if len(indices) == 0:
        names = sorted({r.name for r in topology.residues()})
        shown = ", ".join(names[:25]) + (f", ... ({len(names)} in all)" if len(names) > 25 else "")
        raise SetupError(f"selection '{expr}' matched no atoms; residue names present: {shown}")
    return indices


class _AtomTable:
    """Per-atom attribute arrays, built once per topology."""

    def __init__(self, topology: app.Topology, positions=None, box=None):
        atoms = list(topology.atoms())
        self.n = len(atoms)
        self.residue = np.array([a.residue.index for a in atoms], dtype=np.int64)
        self.positions = None if positions is None else np.asarray(
            positions.value_in_unit(unit.nanometer) if hasattr(positions, "value_in_unit") else positions,
            dtype=np.float64).reshape(-1, 3)
        if self.positions is not None and len(self.positions) != self.n:
            raise SetupError(f"selection: {len(self.positions)} positions for {self.n} atoms")
        self.box = None if box is None else np.asarray(box, dtype=np.float64).reshape(3, 3)
        self.resname = np.array([a.residue.name for a in atoms], dtype=object)
        self.resid = np.array([a.residue.id for a in atoms], dtype=object)
        self.name = np.array([a.name for a in atoms], dtype=object)
        self.chain = np.array([a.residue.chain.id for a in atoms], dtype=object)
        self.element = np.array([a.element.symbol.lower() if a.element is not None else "" for a in atoms],
                                dtype=object)
        # numeric residue numbers (None where the id is not an integer, e.g. with an insertion code)
        self.resnum = np.array([_to_int(r) for r in self.resid], dtype=object)


def _to_int(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


class _Parser:
    """Recursive descent over the tokens; each rule returns a boolean mask over atoms."""

    def __init__(self, tokens: list[str], expr: str, table: _AtomTable):
        self.tokens, self.expr, self.t, self.pos = tokens, expr, table, 0

    def error(self, msg: str) -> SetupError:
        return SetupError(f"selection '{self.expr}': {msg}; grammar: KEYWORD VALUE... combined with and/or/not/( ), "
                          f"byres SEL, within DISTANCE of SEL; keywords: {', '.join(KEYWORDS)}")

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def parse(self) -> np.ndarray:
        mask = self.expr_()
        if self.peek() is not None:
            raise self.error(f"unexpected token '{self.peek()}'")
        return mask

    def expr_(self) -> np.ndarray:
        mask = self.term()
        while (tok := self.peek()) is not None and tok.lower() == "or":
            self.pos += 1
            mask = mask | self.term()
        return mask

    def term(self) -> np.ndarray:
        mask = self.factor()
        while (tok := self.peek()) is not None and tok.lower() == "and":
            self.pos += 1
            mask = mask & self.factor()
        return mask

    def factor(self) -> np.ndarray:
        tok = self.peek()
        if tok is None:
            raise self.error("expression ends too early")
        low = tok.lower()
        self.pos += 1
        if low == "not":
            return ~self.factor()
        if low == "byres":
            return np.isin(self.t.residue, self.t.residue[self.factor()])
        if low == "within":
            return self.within()
        if tok == "(":
            mask = self.expr_()
            if self.peek() != ")":
                raise self.error("missing ')'" if self.peek() is None else f"expected ')' before '{self.peek()}'")
            self.pos += 1
            return mask
        if low not in KEYWORDS:
            raise self.error(f"unknown keyword '{tok}'")
        values = []
        while (v := self.peek()) is not None and v not in ("(", ")") and v.lower() not in OPERATORS + KEYWORDS:
            values.append(v)
            self.pos += 1
        if not values:
            raise self.error(f"keyword '{tok}' needs at least one value")
        return getattr(self, f"match_{low}")(values)

    def within(self) -> np.ndarray:
        """``within DISTANCE of FACTOR`` (after the keyword): atoms within the distance of any atom of FACTOR."""
        dist = self.peek()
        m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(nm|A)?", dist or "", flags=re.I)
        if not m:
            raise self.error(f"'within' needs a distance, e.g. within 0.3 of ... (nm) or within 3A of ... (Å), not "
                             f"'{dist}'" if dist else "'within' needs a distance and 'of'")
        cutoff = float(m.group(1)) * (0.1 if (m.group(2) or "").lower() == "a" else 1.0)
        self.pos += 1
        if (self.peek() or "").lower() != "of":
            raise self.error(f"expected 'of' after 'within {dist}'")
        self.pos += 1
        ref = self.factor()
        if self.t.positions is None:
            raise self.error("'within' needs the atom positions (a selection given to `mlmm prepare`: it is resolved "
                             "there, on the structure it writes)")
        x, centres = self.t.positions, self.t.positions[ref]
        out = np.zeros(self.t.n, bool)
        for start in range(0, len(centres), 64):                  # (n, 64, 3) at a time: bounded memory
            d = x[:, None, :] - centres[None, start:start + 64, :]
            if self.t.box is not None:                              # minimum image, reduced (OpenMM) box vectors
                for k in (2, 1, 0):
                    v = self.t.box[k]
                    d -= np.round(d[..., k] / v[k])[..., None] * v
            out |= (np.einsum("nmk,nmk->nm", d, d) <= cutoff * cutoff).any(axis=1)
        return out

    # ------------------------------------------------------------------ keywords
    def _isin(self, column: np.ndarray, values: list[str]) -> np.ndarray:
        return np.isin(column, np.array(values, dtype=object))

    def match_resname(self, values: list[str]) -> np.ndarray:
        return self._isin(self.t.resname, values)

    def match_name(self, values: list[str]) -> np.ndarray:
        return self._isin(self.t.name, values)

    def match_chain(self, values: list[str]) -> np.ndarray:
        return self._isin(self.t.chain, values)

    def match_element(self, values: list[str]) -> np.ndarray:
        return self._isin(self.t.element, [v.lower() for v in values])

    def match_resid(self, values: list[str]) -> np.ndarray:
        mask = np.zeros(self.t.n, bool)
        numeric = np.array([r is not None for r in self.t.resnum])
        nums = np.array([r if r is not None else 0 for r in self.t.resnum], dtype=np.int64)
        for v in values:
            m = _RANGE.match(v)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
                if hi < lo:
                    raise self.error(f"empty range '{v}'")
                mask |= numeric & (nums >= lo) & (nums <= hi)
            elif re.fullmatch(r"-?\d+[A-Za-z]", v):        # insertion code: literal match
                mask |= self.t.resid == v
            else:
                raise self.error(f"invalid residue number '{v}' (use 12, 3-7 or 52A)")
        return mask

    def match_index(self, values: list[str]) -> np.ndarray:
        mask = np.zeros(self.t.n, bool)
        for v in values:
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", v)
            if not m:
                raise self.error(f"invalid atom index '{v}' (use 0-based 17 or 0-20)")
            lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            if hi < lo:
                raise self.error(f"empty range '{v}'")
            if hi >= self.t.n:
                raise self.error(f"atom index '{v}' out of range: the system has {self.t.n} atoms (0-{self.t.n - 1})")
            mask[lo:hi + 1] = True
        return mask
