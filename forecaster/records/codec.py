"""The wire codec under its former module name; ``forecaster.records`` exports the same names.

``records.input`` holds input records and their validation, ``records.output`` forecasts and dead letters.
"""

from forecaster.records import *  # noqa: F403
from forecaster.records import __all__  # noqa: F401
