"""forecaster: streaming time-series forecasting with one recurrent step per new value."""

from forecaster.errors import ForecasterError

__all__ = ["ForecasterError", "__version__"]
__version__ = "0.1.0"
