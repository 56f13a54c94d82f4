"""The choices :func:`sinkhorn_ot.sinkhorn` accepts, for code that forwards them.

An application exposing the solver's options (a command-line flag, a config schema)
imports these instead of copying the lists, so it stays in step with the library.

Example:
    >>> from sinkhorn_ot.options import BACKENDS, GRADS, METHODS, STOP_RULES
    >>> "log" in METHODS, "implicit" in GRADS, "auto" in BACKENDS, "marginals" in STOP_RULES
    (True, True, True, True)
"""

#: ``method=``: log-sum-exp updates, kernel-form scalings, the stabilised kernel form
#: (native CPU), or a choice made per call.
METHODS = ("log", "kernel", "stabilised", "auto")
#: ``grad=``: how gradients reach the inputs (docs/conventions.md).
GRADS = ("implicit", "envelope", "unroll", "none")
#: ``backend=``: native kernels where built, else torch; or one of them explicitly.
BACKENDS = ("auto", "torch", "native")
#: ``stop=``: the stopping rule (relaxed problems always stop on their potentials).
STOP_RULES = ("marginals", "potentials")
#: ``newton=``: the Newton polish of slow problems, always where it applies, or never.
NEWTON = ("auto", True, False)
