"""Error classes shared by the whole project.

``SetupError``: the input is wrong (file, selection, XML, model); raised before step 0, says what/where/fix.
``CalculationFailed``: a calculation went wrong during a run (NaN forces, exploding structure, dead client).
The CLI turns both into one clear line on stderr and a non-zero exit code.
"""


class MLMMError(Exception):
    """Base class of the project's errors."""


class SetupError(MLMMError, ValueError):
    """Bad input detected before the simulation starts."""


class CalculationFailed(MLMMError, RuntimeError):
    """A force/energy evaluation failed or produced unphysical values."""


class ProtocolError(MLMMError, ConnectionError):
    """The i-PI socket peer sent something that does not follow the protocol."""
