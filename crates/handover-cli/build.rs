//! Links the `handover` binary on Linux (glibc) with GCC's unwinder as a
//! static library (libgcc_eh, as `+crt-static` builds do) instead of
//! libgcc_s.so.1: one shared library fewer to load, and libgcc_s's
//! constructor (which runs CPUID, an exit to the hypervisor in a VM) no
//! longer runs at every start. `handover put` and `get` are run once per
//! handle from scripts, and start-up is most of what they cost
//! (docs/benchmarks.md, the holder scenario). Panics, unwinding and
//! backtraces work as before; glibc stays shared (user lookups use NSS).

fn main() {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && !var("CARGO_CFG_TARGET_FEATURE")
            .split(',')
            .any(|f| f == "crt-static")
    {
        println!(
            "cargo:rustc-link-arg-bin=handover=-Wl,--push-state,--whole-archive,-lgcc_eh,--pop-state"
        );
    }
    println!("cargo:rerun-if-changed=build.rs");
}
