"""cupy.cuda.graph.Graph for the stand-in: the recorded work, replayed in order."""

from .. import _current_stream, _strict


class Graph:
    __getattr__ = _strict("cupy.cuda.graph.Graph")

    def __init__(self, work):
        self._work = list(work)

    def upload(self, stream=None):
        pass

    def launch(self, stream=None):
        stream = _current_stream() if stream is None else stream
        if stream._capture is not None:
            stream._capture.extend(self._work)   # a graph launched inside a capture: nested
            return
        for w in self._work:
            w()
