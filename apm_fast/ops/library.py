"""``torch.library`` custom ops generated for any table (namespace ``apm_fast``).

``torch.compile`` cannot look inside a compiled kernel's launcher (autotuning, host-side
heuristics, a C++ extension), so while it traces an opaque table the primitives go through one
custom op per (table, primitive), named ``apm_fast::<table>_<primitive>``, whose schema is the
contract's (``contract.PRIMITIVES``) and whose fake implementation gives the output shapes and
dtypes from ``contract.OUTPUTS``: all the tracer needs. Eager code calls the table directly (no
dispatcher overhead per launch). The ops of a table are registered the first time they are asked
for, once per process.
"""
from __future__ import annotations

import types

import torch

from .contract import OUTPUTS, PRIMITIVES

__all__ = ["NAMESPACE", "ops_for"]

NAMESPACE = "apm_fast"
_REGISTERED: dict = {}


def _db(db, dw):
    """Custom ops cannot return None: a missing bias gradient is an (S, 0) tensor."""
    return db if db is not None else dw.new_empty((dw.shape[0], 0))


def _impl(table, prim):
    fn = getattr(table, "_" + prim)
    if prim in ("linear_bwd_weight", "first_layer_bwd_weight"):
        if table.wgrad_out:
            def run(*args):
                dw, db = fn(*args, None, None)
                return dw, _db(db, dw)
        else:
            def run(*args):
                dw, db = fn(*args)
                return dw, _db(db, dw)
        return run
    if prim == "adam_":
        def run(*args):
            fn(*args)
        return run
    return fn


def _fake(prim):
    if prim == "adam_":
        return lambda *args: None

    def fake(*args):
        ref = next(a for a in args if isinstance(a, torch.Tensor))
        outs = [ref.new_empty(shape, dtype=dtype) for shape, dtype in OUTPUTS[prim](*args)]
        return outs[0] if len(outs) == 1 else tuple(outs)
    return fake


def ops_for(table) -> types.SimpleNamespace:
    """The custom ops of ``table`` (registered on first use): ``ops_for(t).linear(...)`` etc.,
    positional arguments in the order of the contract's schemas."""
    name = table.name
    if name not in _REGISTERED:
        ops = {}
        for prim, schema in PRIMITIVES.items():
            mutates = ("params", "exp_avg", "exp_avg_sq", "lowp") if prim == "adam_" else ()
            op = torch.library.custom_op(f"{NAMESPACE}::{name}_{prim}", _impl(table, prim),
                                         mutates_args=mutates, schema=schema)
            op.register_fake(_fake(prim))
            ops[prim] = getattr(getattr(torch.ops, NAMESPACE), f"{name}_{prim}")
        _REGISTERED[name] = types.SimpleNamespace(**ops)
    return _REGISTERED[name]
