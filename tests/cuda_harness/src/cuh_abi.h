// cuh_abi.h: the plain-C interface between the runner executable (runner.cpp) and a kernel
// module (a .so built from one kernels/*.cu by harness.py, see cuh_module.h).
#pragma once
#include <cstddef>

namespace cuh {
constexpr int kAbiVersion = 1;

enum Schedule : unsigned { SCHEDULE_RANDOM = 0, SCHEDULE_FORWARD = 1, SCHEDULE_REVERSE = 2 };

struct LaunchConfig {
    unsigned grid[3];
    unsigned block[3];
    unsigned shared_mem;          // dynamic shared memory, bytes
    unsigned schedule;            // Schedule
    unsigned long long seed;
};

// Returns 0, or nonzero with a message in err (a launch the CUDA runtime would refuse).
// A fault inside the kernel (deadlock, bad warp mask, ASan report) ends the process.
typedef int (*LaunchFn)(const LaunchConfig* cfg, void** args, char* err, size_t errlen);

struct Entry {
    const char* name;        // the name expression, e.g. "gemm_tiled<float, 0, 1, 2>"
    const char* signature;   // one code per kernel parameter, comma-separated (see cuh_module.h)
    LaunchFn launch;
};

struct ModuleInfo {
    int abi;
    int n_entries;
    const Entry* entries;
};
}  // namespace cuh

// Every module exports exactly this symbol.
extern "C" typedef const cuh::ModuleInfo* (*cuh_module_info_fn)();
#define CUH_MODULE_INFO_SYMBOL "cuh_module_info"
