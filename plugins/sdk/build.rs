//! A `no_std` guest still calls `memcmp`, `memcpy` and friends (emitted by the
//! compiler); on wasm32-wasip2 they come from the target's own wasi-libc archive. Only
//! those objects are linked: they import nothing.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        println!("cargo:rustc-link-lib=c");
    }
}
