"""The CPU execution harness for kernels/*.cu (see README.md)."""

from .harness import (BUILD_DIR, KERNELS_DIR, SCHEDULES, BuildError, CpuContext, CpuKernel,
                      GpuOnly, HarnessError, HarnessWarning, KernelFault, LaunchError, ModuleSpec,
                      build_module, build_modules, build_runner, compiler, runner, sanitize, sanitizer,
                      scan_source, unavailable)

__all__ = ["BUILD_DIR", "KERNELS_DIR", "SCHEDULES", "BuildError", "CpuContext", "CpuKernel",
           "GpuOnly", "HarnessError", "HarnessWarning", "KernelFault", "LaunchError", "ModuleSpec",
           "build_module", "build_modules", "build_runner", "compiler", "runner", "sanitize", "sanitizer",
           "scan_source", "unavailable"]
