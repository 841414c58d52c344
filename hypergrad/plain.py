"""Whether a call is plain: eager tensors, no ``torch.func`` transform and no ``torch.compile`` trace active.

Plain calls may take the fastest eager route (``torch.autograd`` graphs in ``hypergrad.kernels``, multi-tensor
``torch._foreach_*`` arithmetic in ``hypergrad.tree``), which transforms cannot batch or trace; every other
call takes the composable ``torch.func`` route. Both give the same numbers.
"""

from __future__ import annotations

import torch


def plain_call() -> bool:
    """Whether tensors here are plain: no torch.compile trace and no torch.func transform (vmap, grad, jvp) active."""
    if torch.compiler.is_compiling():  # checked first: dynamo folds it to a constant
        return False
    return torch._C._functorch.peek_interpreter_stack() is None
