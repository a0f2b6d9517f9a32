"""Make xfuser 0.7.0 importable and usable for Ulysses sequence parallelism on CPU (gloo).

xfuser assumes an accelerator: importing it raises "No Accelerators" (its `envs` asks for a device
version and a distributed backend), it reports yunchang's long-context attention as missing without
CUDA, and its USP layer binds yunchang's process-group registry only when CUDA is available. This
patches exactly those points, so the same worker code runs SP=2 on CPU for development and CI.
On a CUDA host it does nothing. Call it before the first `import xfuser` of the process.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def install() -> None:
    import torch

    if torch.cuda.is_available() or "xfuser" in sys.modules:
        return
    # Load `xfuser.envs` alone (its package __init__ imports every pipeline, which reads the
    # device version): a bare package module stands in for `xfuser` during that one import.
    spec = importlib.util.find_spec("xfuser")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("xfuser is not installed")
    bare = types.ModuleType("xfuser")
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules["xfuser"] = bare
    try:
        import xfuser.envs as envs
    finally:
        del sys.modules["xfuser"]
    envs.get_device_version = lambda: None
    envs.get_torch_distributed_backend = lambda: "gloo"
    envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = True

    import xfuser  # noqa: F401  (the real package, reusing the patched envs)
    import xfuser.model_executor.layers.usp as usp
    import yunchang.globals

    usp.PROCESS_GROUP = yunchang.globals.PROCESS_GROUP
