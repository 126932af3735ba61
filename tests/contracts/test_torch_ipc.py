"""The CUDA IPC tuple bridges/shared_memory.py relies on, read from the installed torch, on CPU.

`export_tensor` sends `storage._share_cuda_()` as is; `attach_tensor` replaces its first element
by this process's index of the exporter's GPU and calls `UntypedStorage._new_shared_cuda(*parts)`.
That is right only while torch itself rebuilds a CUDA storage the same way: the 8 values
`_share_cuda_()` returns, device first, go in the same order into `_new_shared_cuda`. torch's own
pickling (`torch.multiprocessing.reductions`) is read here to check it.
"""

from __future__ import annotations

import ast
import inspect

import torch
import torch.multiprocessing.reductions as reductions


def function_ast(fn) -> ast.FunctionDef:
    return ast.parse(inspect.getsource(fn)).body[0]


def share_cuda_unpack() -> list[str]:
    """The names torch unpacks `storage._share_cuda_()` into (reduce_tensor)."""
    for node in ast.walk(function_ast(reductions.reduce_tensor)):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                and getattr(node.value.func, "attr", None) == "_share_cuda_":
            return [elt.id for elt in node.targets[0].elts]
    raise AssertionError("reduce_tensor no longer unpacks storage._share_cuda_()")


def new_shared_cuda_args() -> list[str]:
    """The parameter names torch passes to `_new_shared_cuda`, in order (rebuild_cuda_tensor)."""
    for node in ast.walk(function_ast(reductions.rebuild_cuda_tensor)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_new_shared_cuda":
            return [arg.id for arg in node.args]
    raise AssertionError("rebuild_cuda_tensor no longer calls _new_shared_cuda")


def test_share_and_rebuild_exist():
    assert callable(torch.UntypedStorage._share_cuda_)
    assert callable(torch.UntypedStorage._new_shared_cuda)


def test_share_cuda_output_is_new_shared_cuda_input_device_first():
    unpacked = share_cuda_unpack()
    rebuilt = new_shared_cuda_args()
    assert len(unpacked) == len(rebuilt) == 8
    assert unpacked[0] == "device" and rebuilt[0] == "storage_device"
    # reduce_tensor ships the unpacked values to rebuild_cuda_tensor's parameters; follow them.
    ret = next(n for n in ast.walk(function_ast(reductions.reduce_tensor))
               if isinstance(n, ast.Return) and isinstance(n.value, ast.Tuple)
               and getattr(n.value.elts[0], "id", None) == "rebuild_cuda_tensor")
    shipped = [getattr(e, "id", None) for e in ret.value.elts[1].elts]
    params = list(inspect.signature(reductions.rebuild_cuda_tensor).parameters)
    received = {name: params[shipped.index(name)] for name in unpacked}
    assert [received[name] for name in unpacked] == rebuilt
