// runner.cpp: the process that runs kernel modules for harness.py.
//
// Built with AddressSanitizer (like the modules it dlopens), so Python itself needs no
// LD_PRELOAD. harness.py talks to it over stdin/stdout with the little-endian messages
// below; the kernels' own printf output goes to stderr (fd 1 is redirected), which harness.py
// collects in a file and shows when the runner dies (an ASan report, a harness FAULT).
//
//   request  := u32 op, ...
//   LOAD   (1): u32 len, path                -> u32 status; ok: u32 module, u32 n, n x (str name, str sig)
//   LAUNCH (2): u32 module, u32 entry, LaunchConfig,
//               u32 nbuf, nbuf x (u64 nbytes, u8 copy_back, bytes),
//               u32 narg, narg x (u8 kind: 0 scalar -> str bytes | 1 buffer -> u32 index)
//                                          -> u32 status; ok: the copy_back buffers' bytes, in order
//   status: 0 ok, else followed by str message.  str := u32 len, bytes
//
// Every buffer is a fresh allocation of exactly nbytes (256-byte aligned, like cudaMalloc),
// so ASan reports a kernel reading or writing one byte past an array.
#include "cuh_abi.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

int g_in = 0, g_out = -1;

void read_exact(void* dst, size_t n) {
    auto* p = static_cast<char*>(dst);
    while (n) {
        ssize_t r = read(g_in, p, n);
        if (r <= 0) _exit(0);   // harness.py closed the pipe
        p += r;
        n -= (size_t)r;
    }
}

void write_exact(const void* src, size_t n) {
    auto* p = static_cast<const char*>(src);
    while (n) {
        ssize_t r = write(g_out, p, n);
        if (r <= 0) _exit(0);
        p += r;
        n -= (size_t)r;
    }
}

template <class T> T get() { T v; read_exact(&v, sizeof v); return v; }
template <class T> void put(T v) { write_exact(&v, sizeof v); }

std::string get_str() {
    std::string s(get<uint32_t>(), '\0');
    read_exact(s.data(), s.size());
    return s;
}

void put_str(const std::string& s) {
    put<uint32_t>((uint32_t)s.size());
    write_exact(s.data(), s.size());
}

void put_error(uint32_t status, const std::string& msg) {
    put<uint32_t>(status);
    put_str(msg);
}

struct Module {
    const cuh::ModuleInfo* info;
};
std::vector<Module> g_modules;

void load() {
    std::string path = get_str();
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) return put_error(1, std::string("dlopen failed: ") + dlerror());
    auto fn = (cuh_module_info_fn)dlsym(h, CUH_MODULE_INFO_SYMBOL);
    if (!fn) return put_error(1, "not a harness module: no " CUH_MODULE_INFO_SYMBOL);
    const cuh::ModuleInfo* info = fn();
    if (info->abi != cuh::kAbiVersion) return put_error(1, "module ABI version mismatch");
    g_modules.push_back(Module{info});
    put<uint32_t>(0);
    put<uint32_t>((uint32_t)g_modules.size() - 1);
    put<uint32_t>((uint32_t)info->n_entries);
    for (int i = 0; i < info->n_entries; ++i) {
        put_str(info->entries[i].name);
        put_str(info->entries[i].signature);
    }
}

struct Buffer {
    void* ptr = nullptr;
    uint64_t nbytes = 0;
    bool copy_back = false;
    ~Buffer() { std::free(ptr); }
};

void launch() {
    uint32_t mod = get<uint32_t>(), entry = get<uint32_t>();
    cuh::LaunchConfig cfg = get<cuh::LaunchConfig>();
    uint32_t nbuf = get<uint32_t>();
    std::vector<Buffer> bufs(nbuf);
    for (Buffer& b : bufs) {
        b.nbytes = get<uint64_t>();
        b.copy_back = get<uint8_t>() != 0;
        if (posix_memalign(&b.ptr, 256, b.nbytes) != 0) {
            std::fprintf(stderr, "runner: cannot allocate %llu bytes\n", (unsigned long long)b.nbytes);
            _exit(70);
        }
        read_exact(b.ptr, b.nbytes);
    }
    uint32_t narg = get<uint32_t>();
    std::vector<void*> args(narg);
    std::vector<void*> pointers(narg);             // the values of pointer parameters
    std::vector<std::unique_ptr<max_align_t[]>> scalars(narg);
    for (uint32_t i = 0; i < narg; ++i) {
        uint8_t kind = get<uint8_t>();
        if (kind == 0) {
            uint32_t len = get<uint32_t>();
            scalars[i].reset(new max_align_t[len / sizeof(max_align_t) + 1]);
            read_exact(scalars[i].get(), len);
            args[i] = scalars[i].get();
        } else {
            uint32_t idx = get<uint32_t>();
            pointers[i] = idx < nbuf ? bufs[idx].ptr : nullptr;
            args[i] = &pointers[i];
        }
    }
    if (mod >= g_modules.size() || (int)entry >= g_modules[mod].info->n_entries)
        return put_error(1, "no such module or entry");
    char err[512] = {0};
    int rc = g_modules[mod].info->entries[entry].launch(&cfg, args.data(), err, sizeof err);
    std::fflush(stdout);
    if (rc != 0) return put_error(2, err);
    put<uint32_t>(0);
    for (const Buffer& b : bufs)
        if (b.copy_back) write_exact(b.ptr, b.nbytes);
}

}  // namespace

int main() {
    g_out = dup(1);
    dup2(2, 1);   // kernel printf must not corrupt the protocol
    for (;;) {
        uint32_t op = get<uint32_t>();
        if (op == 1) load();
        else if (op == 2) launch();
        else { std::fprintf(stderr, "runner: unknown request %u\n", op); return 2; }
    }
}
