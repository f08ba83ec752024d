"""csra-triton: multi-head class-specific residual attention (CSRA, ICCV 2021) as Triton kernels.

Data path: ``reference`` (eager, official structure) -> ``kernels`` (Triton) -> ``ops`` (custom
ops + autograd, CPU fallback in ``fallback``) -> ``module`` (``csra``, ``CSRATriton``) -> CLI
(``python -m csra_triton``).
"""
from .interop import OfficialCheckpointError
from .module import CSRATriton, csra, load_official
from .ops import CSRAFunction, use_backend
from .reference import OFFICIAL_TEMPERATURES, csra_reference
from . import reference

__all__ = ["CSRATriton", "csra", "CSRAFunction", "use_backend", "reference", "csra_reference",
           "OFFICIAL_TEMPERATURES", "load_official", "OfficialCheckpointError"]
__version__ = "0.1.0"
