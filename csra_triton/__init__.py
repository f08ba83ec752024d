"""csra-triton: multi-head class-specific residual attention (CSRA, ICCV 2021) as Triton kernels.

Data path, as layers (pyproject.toml's import-linter contracts): ``settings`` -> helpers
(``common``, ``reference``, ``archs``) -> kernels and configs (``kernels``, ``tuning``) -> the
two implementations (``triton_impl``, ``fallback``) -> the op (``ops``: custom ops, triton_ops,
autograd) -> ``module`` (``csra``, ``CSRATriton``), ``maps``, ``interop`` -> ``models`` (the
official full models) -> the ``tools`` subpackage (benchmarks, compile report, host-path
timing, demo, CLI), which the runtime never imports.
"""
from .interop import OfficialCheckpointError
from .module import CSRAFunction, CSRATriton, csra, load_official
from .ops import use_backend
from .reference import OFFICIAL_TEMPERATURES, csra_reference
from . import reference

__all__ = ["CSRATriton", "csra", "CSRAFunction", "use_backend", "reference", "csra_reference",
           "OFFICIAL_TEMPERATURES", "load_official", "OfficialCheckpointError"]
__version__ = "0.1.0"
