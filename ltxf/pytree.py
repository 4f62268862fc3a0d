"""The package-local optree namespace.

``from ltxf import pytree`` gives optree's pytree API (``flatten``, ``unflatten``, ``map``, ``leaves``,
``dataclasses``, ``functools``, ...) with ``namespace="ltxf"`` bound by default, so custom nodes registered
here (``TrainState``) flatten at every call site without anyone having to remember the namespace
(style-anchors A.11, C.2). optree is the only pytree library in ltxf: never zip its leaves with leaves
flattened by ``torch.utils._pytree`` (dict orders differ).
"""

import sys

import optree

NAMESPACE = "ltxf"

# optree.pytree.reexport registers the module it builds under the given name in sys.modules and refuses a
# name that already exists. This file is that name, so it steps aside first; the import system then hands
# out the re-exported module (it reads sys.modules[__name__] back after executing this file).
_self = sys.modules.pop(__name__)
try:
    _reexported = optree.pytree.reexport(namespace=NAMESPACE, module=__name__)
except BaseException:
    sys.modules[__name__] = _self
    raise
_reexported.NAMESPACE = NAMESPACE
