/* Wine 8.0 has no bcryptprimitives.dll, which Rust's std imports for
 * ProcessPrng; without it every Rust .exe exits 53 at load. This stand-in
 * forwards ProcessPrng to advapi32's SystemFunction036 (RtlGenRandom).
 * Built by scripts/windows-test.sh into the Wine prefix; never shipped. */
#include <windows.h>
typedef BOOLEAN (WINAPI *gen_random_fn)(PVOID, ULONG);
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    static gen_random_fn gen;
    if (!gen) {
        HMODULE advapi = LoadLibraryA("advapi32.dll");
        if (!advapi) return FALSE;
        gen = (gen_random_fn)GetProcAddress(advapi, "SystemFunction036");
        if (!gen) return FALSE;
    }
    while (len > 0) {
        ULONG chunk = len > 0x7fffffff ? 0x7fffffff : (ULONG)len;
        if (!gen(data, chunk)) return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
