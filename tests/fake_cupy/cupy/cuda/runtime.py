"""cupy.cuda.runtime for the stand-in: one device, fixed versions (CUDA 13.2 here)."""

from .. import _check_surface


class CUDARuntimeError(RuntimeError):
    def __init__(self, message):
        self.status = message.split(":")[0]
        super().__init__(message)


def __getattr__(name):
    _check_surface("cupy.cuda.runtime", name)
    from .. import FakeCupyError
    raise FakeCupyError(f"fake cupy: cupy.cuda.runtime.{name} is not imitated")


# Device attributes: CuPy 14.2's cudaDevAttr* values (CUDA's enum), an H100 SXM's answers.
cudaDevAttrClockRate = 13
cudaDevAttrMultiProcessorCount = 16
cudaDevAttrMemoryClockRate = 36
cudaDevAttrGlobalMemoryBusWidth = 37
cudaDevAttrL2CacheSize = 38
cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
_ATTRIBUTES = {13: 1_980_000, 16: 132, 36: 2_619_000, 37: 5120, 38: 50 << 20, 97: 232448}


def deviceGetAttribute(attrib, device):
    if int(device) != 0:
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    if attrib not in _ATTRIBUTES:
        from .. import FakeCupyError
        raise FakeCupyError(f"fake cupy: device attribute {attrib} is not imitated")
    return _ATTRIBUTES[attrib]


def getDeviceCount():
    from .._kernels import _ch
    if _ch.compiler() is None:   # no g++: the harness cannot build a kernel, so no "device"
        raise CUDARuntimeError("cudaErrorNoDevice: fake cupy: no host C++ compiler (g++) for "
                               "the CPU harness that runs its kernels")
    return 1


def getDevice():
    return 0


def driverGetVersion():
    return 13020


def runtimeGetVersion():
    return 13020


def getDeviceProperties(device):
    if int(device) != 0:
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    return {"name": b"fake cupy (CPU harness)", "totalGlobalMem": 80 << 30,
            "multiProcessorCount": 132, "major": 9, "minor": 0, "warpSize": 32,
            "sharedMemPerBlockOptin": 232448, "l2CacheSize": 50 << 20}


def deviceSynchronize():
    from .. import _host_sync
    from . import Stream
    _host_sync("deviceSynchronize", Stream._capturing_streams)


def memGetInfo():
    return (64 << 30, 80 << 30)
