"""The warnings our entry points hide, in one place.

Imports nothing from megatron-core: call :func:`quiet_backend_warnings` before megatron-core is
first imported, because it warns at import time, once per module.
"""

import warnings

# megatron-core's notices that Transformer Engine / apex are absent (entry points report the
# layer spec they picked instead) and a TransformerConfig default it calls deprecated.
_BACKEND_NOTICES = r".*(Transformer Engine|Apex|apex|full scope).*"


def quiet_backend_warnings(hide_deprecations: bool = False) -> None:
    """Hide megatron-core's missing-TE/apex notices; with ``hide_deprecations`` also the
    FutureWarnings torch and megatron emit around checkpoint loading (tools, not training)."""
    warnings.filterwarnings("ignore", message=_BACKEND_NOTICES)
    if hide_deprecations:
        warnings.filterwarnings("ignore", category=FutureWarning)
