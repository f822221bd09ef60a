"""cupy.cuda.profiler for the stand-in: start/stop are no-ops (no profiler attached)."""


def start():
    pass


def stop():
    pass
