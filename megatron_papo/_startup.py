"""Interpreter start-up hook (installed as a ``.pth`` file by ``scripts/install.sh``).

Some processes that import torchvision are not ours: vLLM inspects model classes in a fresh
``python -m vllm.model_executor.models.registry`` subprocess, torchrun starts workers, and so on.
They never call :func:`megatron_papo.compat.apply_cpu_patches`, so the CUDA build of torchvision
fails there with ``operator torchvision::nms does not exist``. This hook makes the torchvision
fix (``torchvision_cpu.patch_torchvision_meta_registrations``) run in every interpreter of the
project's virtual environment, right before torchvision's first import and only then (start-up
cost: this small module, which imports nothing heavy; it lives outside ``compat`` because that
package imports torch). Opt out with ``MEGATRON_PAPO_NO_STARTUP_HOOK=1``.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

PTH_NAME = "megatron_papo_startup.pth"
PTH_LINE = ("import os, sys; exec('try:\\n import megatron_papo._startup as _m\\n "
            "_m.install()\\nexcept Exception:\\n pass')\n")


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            # imports torch: only now (this hook runs in every interpreter)
            from megatron_papo.compat.torchvision_cpu import (
                patch_torchvision_meta_registrations,
            )

            patch_torchvision_meta_registrations()
        return None  # the regular finders import it


def install() -> None:
    if os.environ.get("MEGATRON_PAPO_NO_STARTUP_HOOK") == "1" or "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


def write_pth(site_packages: str) -> str:
    """Write the .pth file into ``site_packages`` (called by the install script)."""
    path = os.path.join(site_packages, PTH_NAME)
    with open(path, "w") as f:
        f.write(PTH_LINE)
    return path


if __name__ == "__main__":  # python -m megatron_papo._startup <site-packages>
    print(write_pth(sys.argv[1]))
