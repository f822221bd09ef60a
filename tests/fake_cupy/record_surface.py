"""Write the attribute surface of the real CuPy (run where it imports; no GPU needed)."""
import json, os, sys
# Python puts this script's folder, the stand-in's, first on sys.path: drop it, or
# `import cupy` below would record the stand-in instead of the real CuPy.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
import cupy, cupy.cuda, cupy.cuda.runtime, cupy.cuda.graph, cupy.random, cupy.linalg
def names(obj):
    return sorted(n for n in dir(obj))
surface = {
    "cupy_version": cupy.__version__,
    "cupy": names(cupy),
    "cupy.ndarray": names(cupy.ndarray),
    "cupy.cuda": names(cupy.cuda),
    "cupy.cuda.runtime": names(cupy.cuda.runtime),
    "cupy.cuda.Stream": names(cupy.cuda.Stream),
    "cupy.cuda.Event": names(cupy.cuda.Event),
    "cupy.cuda.Device": names(cupy.cuda.Device),
    "cupy.cuda.MemoryPool": names(cupy.cuda.MemoryPool),
    "cupy.cuda.MemoryPointer": names(cupy.cuda.MemoryPointer),
    "cupy.cuda.UnownedMemory": names(cupy.cuda.UnownedMemory),
    "cupy.cuda.graph.Graph": names(cupy.cuda.graph.Graph),
    "cupy.RawModule": names(cupy.RawModule),
    "cupy.RawKernel": names(cupy.RawKernel),
    "flags": names(cupy._core.flags.Flags),
    "cupy.random": names(cupy.random),
    "cupy.random.RandomState": names(cupy.random.RandomState),
    "cupy.linalg": names(cupy.linalg),
}
json.dump(surface, sys.stdout, indent=0, sort_keys=True)
