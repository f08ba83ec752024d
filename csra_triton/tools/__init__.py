"""The tools around the runtime (the tools layer, docs/architecture.md): ``benchmark`` (the
benchmark shapes' timings against the official head), ``compiled`` (the compile report for
GPUs that are not there), ``hostpath`` (host time with the launches stubbed), ``demo`` and
``viz`` (the synthetic dataset, attention-map figures) and ``cli`` (``python -m csra_triton``).

No runtime module imports this package (pyproject.toml's import contract); the tools reach the
runtime through its functions and their parameters only.
"""
