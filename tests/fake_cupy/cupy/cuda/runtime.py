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


def getDeviceCount():
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
    _host_sync("deviceSynchronize")


def memGetInfo():
    return (64 << 30, 80 << 30)
