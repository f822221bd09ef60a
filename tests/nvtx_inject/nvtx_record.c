/* A minimal NVTX tool: records every range push/pop it receives to a text file.
 *
 * NVTX's tool-injection mechanism: at the first NVTX call in a process, the NVTX
 * headers compiled into the instrumented code (here the `nvtx` Python package) read
 * NVTX_INJECTION64_PATH, dlopen that library and call its InitializeInjectionNvtx2 with
 * a function that hands out export tables. Through the CALLBACKS export table the tool
 * writes its own function pointers into the instrumented code's dispatch tables; from
 * then on every nvtx* call lands here. Without a tool, every nvtx* call is a no-op and
 * nvtxDomainIsEnabled() returns 0, which the nvtx package turns into a DummyDomain.
 *
 * Handled entry points (all the push/pop variants a Python NVTX client may use):
 *   core:  nvtxRangePushA, nvtxRangePushEx, nvtxRangePop          (global domain)
 *   core2: nvtxDomainCreateA, nvtxDomainDestroy, nvtxDomainRegisterStringA,
 *          nvtxDomainRangePushEx, nvtxDomainRangePop              (named domains)
 * A message may be ASCII or a registered string handle (returned by
 * nvtxDomainRegisterStringA, i.e. by this tool, so it points at our own copy).
 *
 * Output (NVTX_RECORD_PATH; when unset, events are only counted, which is what the
 * overhead benchmark uses), one line per event, tab-separated:
 *   push  <thread> <depth> <entry point> <message type> <domain> <name>
 *   pop   <thread> <depth> <entry point> <domain>
 *   error <thread> <text>                 (a pop with nothing pushed, ...)
 * <depth> is the per-thread, per-domain nesting depth: 1 for an outermost push, and a
 * pop reports the depth of the range it closes. <domain> is "-" for the global domain.
 *
 * Built by tests/test_nvtx.py:  gcc -shared -fPIC -O2 -I<cuda>/include nvtx_record.c
 *                               -o libnvtx_record.so -lpthread
 */
#include <nvtx3/nvToolsExt.h>

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DOMAINS 64

typedef struct {
    char *name;                  /* "" for the global domain */
} tool_domain;

typedef struct {
    tool_domain *domain;
    char *text;
} tool_string;

static FILE *g_out = NULL;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static tool_domain g_global_domain = {""};
static unsigned long long g_events = 0;

/* Per-thread depth, one counter per domain slot (slot 0: global domain). */
static tool_domain *g_domains[MAX_DOMAINS] = {&g_global_domain};
static int g_ndomains = 1;
static __thread int t_depth[MAX_DOMAINS];
static __thread int t_tid = 0;
static int g_next_tid = 0;

static int thread_id(void)
{
    if (t_tid == 0)
        t_tid = __atomic_add_fetch(&g_next_tid, 1, __ATOMIC_RELAXED);
    return t_tid;
}

static int domain_slot(const tool_domain *d)
{
    int i;
    for (i = 0; i < g_ndomains; ++i)
        if (g_domains[i] == d)
            return i;
    return 0;
}

static const char *domain_label(const tool_domain *d)
{
    return (d == NULL || d->name[0] == '\0') ? "-" : d->name;
}

static void emit(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void emit(const char *fmt, ...)
{
    va_list ap;
    pthread_mutex_lock(&g_lock);
    ++g_events;
    if (g_out) {
        va_start(ap, fmt);
        vfprintf(g_out, fmt, ap);
        va_end(ap);
        fflush(g_out);
    }
    pthread_mutex_unlock(&g_lock);
}

static const char *message_text(const nvtxEventAttributes_t *attr, const char **kind)
{
    if (attr == NULL) {
        *kind = "none";
        return "";
    }
    switch (attr->messageType) {
    case NVTX_MESSAGE_TYPE_ASCII:
        *kind = "ascii";
        return attr->message.ascii ? attr->message.ascii : "";
    case NVTX_MESSAGE_TYPE_REGISTERED:
        *kind = "registered";
        return attr->message.registered
                   ? ((const tool_string *)(const void *)attr->message.registered)->text
                   : "";
    case NVTX_MESSAGE_TYPE_UNICODE:
        *kind = "unicode";
        return "<unicode>";
    default:
        *kind = "unknown";
        return "";
    }
}

static void on_push(tool_domain *d, const char *entry, const char *kind, const char *text)
{
    int depth = ++t_depth[domain_slot(d)];
    emit("push\t%d\t%d\t%s\t%s\t%s\t%s\n", thread_id(), depth, entry, kind, domain_label(d),
         text);
}

static void on_pop(tool_domain *d, const char *entry)
{
    int *depth = &t_depth[domain_slot(d)];
    if (*depth <= 0) {
        emit("error\t%d\t%s with no open range in domain %s\n", thread_id(), entry,
             domain_label(d));
        return;
    }
    emit("pop\t%d\t%d\t%s\t%s\n", thread_id(), *depth, entry, domain_label(d));
    --*depth;
}

/* ---- core (global domain) ---- */

static int NVTX_API rec_RangePushA(const char *message)
{
    on_push(&g_global_domain, "nvtxRangePushA", "ascii", message ? message : "");
    return t_depth[0] - 1;
}

static int NVTX_API rec_RangePushEx(const nvtxEventAttributes_t *attr)
{
    const char *kind;
    const char *text = message_text(attr, &kind);
    on_push(&g_global_domain, "nvtxRangePushEx", kind, text);
    return t_depth[0] - 1;
}

static int NVTX_API rec_RangePop(void)
{
    on_pop(&g_global_domain, "nvtxRangePop");
    return t_depth[0];
}

/* ---- core2 (named domains) ---- */

static nvtxDomainHandle_t NVTX_API rec_DomainCreateA(const char *name)
{
    tool_domain *d = (tool_domain *)calloc(1, sizeof *d);
    d->name = strdup(name ? name : "");
    pthread_mutex_lock(&g_lock);
    if (g_ndomains < MAX_DOMAINS)
        g_domains[g_ndomains++] = d;
    pthread_mutex_unlock(&g_lock);
    emit("domain\t%d\t%s\n", thread_id(), d->name);
    return (nvtxDomainHandle_t)(void *)d;
}

static void NVTX_API rec_DomainDestroy(nvtxDomainHandle_t domain)
{
    (void)domain; /* kept alive: late pops may still name it */
}

static nvtxStringHandle_t NVTX_API rec_DomainRegisterStringA(nvtxDomainHandle_t domain,
                                                             const char *string)
{
    tool_string *s = (tool_string *)calloc(1, sizeof *s);
    s->domain = (tool_domain *)(void *)domain;
    s->text = strdup(string ? string : "");
    return (nvtxStringHandle_t)(void *)s;
}

static int NVTX_API rec_DomainRangePushEx(nvtxDomainHandle_t domain,
                                          const nvtxEventAttributes_t *attr)
{
    tool_domain *d = domain ? (tool_domain *)(void *)domain : &g_global_domain;
    const char *kind;
    const char *text = message_text(attr, &kind);
    on_push(d, "nvtxDomainRangePushEx", kind, text);
    return t_depth[domain_slot(d)] - 1;
}

static int NVTX_API rec_DomainRangePop(nvtxDomainHandle_t domain)
{
    tool_domain *d = domain ? (tool_domain *)(void *)domain : &g_global_domain;
    on_pop(d, "nvtxDomainRangePop");
    return t_depth[domain_slot(d)];
}

static int install(const NvtxExportTableCallbacks *cb, NvtxCallbackModule module,
                   unsigned int id, NvtxFunctionPointer fn)
{
    NvtxFunctionTable table = NULL;
    unsigned int size = 0;
    if (!cb->GetModuleFunctionTable(module, &table, &size) || table == NULL || id > size)
        return 0;
    *table[id] = fn;
    return 1;
}

#define FN(f) ((NvtxFunctionPointer)(void *)(f))

__attribute__((visibility("default"))) int InitializeInjectionNvtx2(
    NvtxGetExportTableFunc_t getExportTable)
{
    const NvtxExportTableCallbacks *cb =
        (const NvtxExportTableCallbacks *)getExportTable(NVTX_ETID_CALLBACKS);
    const char *path = getenv("NVTX_RECORD_PATH");
    int ok = 1;

    if (cb == NULL || cb->struct_size < sizeof(NvtxExportTableCallbacks))
        return 0;
    if (path && path[0]) {
        g_out = fopen(path, "w");
        if (g_out == NULL)
            return 0;
        fprintf(g_out, "init\t%d\tInitializeInjectionNvtx2\n", thread_id());
        fflush(g_out);
    }

    ok &= install(cb, NVTX_CB_MODULE_CORE, NVTX_CBID_CORE_RangePushA, FN(rec_RangePushA));
    ok &= install(cb, NVTX_CB_MODULE_CORE, NVTX_CBID_CORE_RangePushEx, FN(rec_RangePushEx));
    ok &= install(cb, NVTX_CB_MODULE_CORE, NVTX_CBID_CORE_RangePop, FN(rec_RangePop));
    ok &= install(cb, NVTX_CB_MODULE_CORE2, NVTX_CBID_CORE2_DomainCreateA,
                  FN(rec_DomainCreateA));
    ok &= install(cb, NVTX_CB_MODULE_CORE2, NVTX_CBID_CORE2_DomainDestroy,
                  FN(rec_DomainDestroy));
    ok &= install(cb, NVTX_CB_MODULE_CORE2, NVTX_CBID_CORE2_DomainRegisterStringA,
                  FN(rec_DomainRegisterStringA));
    ok &= install(cb, NVTX_CB_MODULE_CORE2, NVTX_CBID_CORE2_DomainRangePushEx,
                  FN(rec_DomainRangePushEx));
    ok &= install(cb, NVTX_CB_MODULE_CORE2, NVTX_CBID_CORE2_DomainRangePop,
                  FN(rec_DomainRangePop));
    return ok;
}

/* Number of events seen (for a ctypes caller; the benchmark reads it). */
__attribute__((visibility("default"))) unsigned long long nvtx_record_event_count(void)
{
    return g_events;
}
