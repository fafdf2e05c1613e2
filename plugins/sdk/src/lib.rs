//! The guest SDK for BSFG policy plugins (`bsfg:policy@0.1.0`, see `plugins/wit/`).
//!
//! A policy is a type implementing [`Policy`] plus one [`export_policy!`] line:
//!
//! ```ignore
//! use bsfg_policy_sdk::{export_policy, Context, Fact, Policy, Settings, Verdict};
//!
//! struct OnlySite(String);
//!
//! impl Policy for OnlySite {
//!     fn init(settings: &Settings) -> Result<Self, String> {
//!         Ok(OnlySite(settings.require("site")?.into()))
//!     }
//!     fn decide(&self, _ctx: &Context, fact: &Fact) -> Verdict {
//!         match fact.label("site") {
//!             Some(s) if s == self.0 => Verdict::Allow,
//!             _ => Verdict::Deny("wrong site".into()),
//!         }
//!     }
//! }
//! export_policy!(OnlySite);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` file is the
//! component a zone's config names. The SDK is `no_std` (with `alloc`): a guest that
//! links Rust's `std` imports WASI interfaces the host does not offer, and is refused
//! at load. It brings its own allocator, and a panic becomes a trap, which the host
//! turns into a fail-closed batch (`policy_fault: ...`).
#![no_std]

extern crate alloc;

pub use alloc::borrow::ToOwned;
pub use alloc::format;
pub use alloc::string::{String, ToString};
pub use alloc::vec::Vec;

/// Generated bindings of the `bsfg:policy/policy@0.1.0` world.
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "bsfg:policy/policy@0.2.0",
        pub_export_macro: true,
        export_macro_name: "export_bindings",
        default_bindings_module: "bsfg_policy_sdk::bindings",
    });
}

pub use bindings::bsfg::policy::host::Level;
pub use bindings::bsfg::policy::types::{ArtifactRef, Context, Fact, Hook, Verdict};

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: arena::SdkAlloc = arena::SdkAlloc;

/// Where the host puts a call's inputs. The canonical ABI asks the guest for memory
/// (`cabi_realloc`) for every string and list of every fact of a batch; a bump arena
/// answers those requests in a few instructions, and the guest's frees of them are
/// no-ops. The arena is reset when the call that received them ends ([`Slot`] drops
/// the inputs first: a policy only ever sees them by reference, so none can outlive
/// the call; copies are made with the regular allocator). Everything else, the
/// policy's own state included, lives in dlmalloc.
#[cfg(target_arch = "wasm32")]
mod arena {
    use core::alloc::{GlobalAlloc, Layout};
    use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

    const FIRST: usize = 256 << 10;
    const MOST: usize = 4 << 20;
    static BASE: AtomicUsize = AtomicUsize::new(0);
    static SIZE: AtomicUsize = AtomicUsize::new(0);
    static TOP: AtomicUsize = AtomicUsize::new(0);
    static OVERFLOWED: AtomicBool = AtomicBool::new(false);

    fn contains(ptr: *mut u8) -> bool {
        let (p, base) = (ptr as usize, BASE.load(Relaxed));
        base != 0 && p >= base && p < base + SIZE.load(Relaxed)
    }

    /// Input memory for the current call, or null when the arena is full (the
    /// caller then uses dlmalloc).
    pub fn alloc(layout: Layout) -> *mut u8 {
        let mut base = BASE.load(Relaxed);
        if base == 0 {
            // SAFETY: a valid, non-zero-sized layout.
            base = unsafe {
                dlmalloc::GlobalDlmalloc.alloc(Layout::from_size_align_unchecked(FIRST, 16))
            } as usize;
            if base == 0 {
                return core::ptr::null_mut();
            }
            BASE.store(base, Relaxed);
            SIZE.store(FIRST, Relaxed);
            TOP.store(base, Relaxed);
        }
        let top = TOP.load(Relaxed);
        let p = (top + layout.align() - 1) & !(layout.align() - 1);
        if p + layout.size() > base + SIZE.load(Relaxed) {
            OVERFLOWED.store(true, Relaxed);
            return core::ptr::null_mut();
        }
        TOP.store(p + layout.size(), Relaxed);
        p as *mut u8
    }

    /// Ends a call: every input is dead. An arena that overflowed doubles (up to 4 MiB).
    pub fn reset() {
        let base = BASE.load(Relaxed);
        if base == 0 {
            return;
        }
        let size = SIZE.load(Relaxed);
        if OVERFLOWED.swap(false, Relaxed) && size < MOST {
            // SAFETY: `base` was allocated by dlmalloc with exactly this layout, and
            // no input of the ended call is referenced any more.
            unsafe {
                dlmalloc::GlobalDlmalloc
                    .dealloc(base as *mut u8, Layout::from_size_align_unchecked(size, 16));
            }
            BASE.store(0, Relaxed);
            let grown = (size * 2).min(MOST);
            // SAFETY: a valid, non-zero-sized layout.
            let b = unsafe {
                dlmalloc::GlobalDlmalloc.alloc(Layout::from_size_align_unchecked(grown, 16))
            } as usize;
            if b != 0 {
                BASE.store(b, Relaxed);
                SIZE.store(grown, Relaxed);
                TOP.store(b, Relaxed);
            }
            return;
        }
        TOP.store(base, Relaxed);
    }

    /// dlmalloc, except that frees of arena memory are no-ops.
    pub struct SdkAlloc;

    // SAFETY: forwards to dlmalloc for every pointer dlmalloc handed out; arena
    // pointers are never passed to dlmalloc.
    unsafe impl GlobalAlloc for SdkAlloc {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller's contract, forwarded.
            unsafe { dlmalloc::GlobalDlmalloc.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if !contains(ptr) {
                // SAFETY: not arena memory, so dlmalloc's; the caller's contract.
                unsafe { dlmalloc::GlobalDlmalloc.dealloc(ptr, layout) }
            }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if !contains(ptr) {
                // SAFETY: not arena memory, so dlmalloc's; the caller's contract.
                return unsafe { dlmalloc::GlobalDlmalloc.realloc(ptr, layout, new_size) };
            }
            // SAFETY: the new layout is valid (the caller's contract); the old block
            // holds `layout.size()` readable bytes.
            unsafe {
                let new = dlmalloc::GlobalDlmalloc
                    .alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
                if !new.is_null() {
                    core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                }
                new
            }
        }
    }
}

/// The canonical ABI's allocator export: the host asks it for the memory that
/// carries a batch into the guest. On wasm32-wasip2 wit-bindgen leaves it to wasi-libc's
/// `malloc`, which would make two allocators free each other's memory in a `no_std`
/// guest; this one uses the Rust global allocator that the bindings free with.
///
/// # Safety
/// Called by the component model with the canonical ABI's contract: `old_ptr` was
/// returned by an earlier call with `old_len` and `align`, `align` is a power of two.
#[cfg(target_arch = "wasm32")]
#[unsafe(export_name = "cabi_realloc")]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{Layout, alloc as allocate, realloc};
    if old_len == 0 && new_len == 0 {
        return align as *mut u8;
    }
    let Ok(layout) = Layout::from_size_align(old_len.max(new_len), align) else {
        core::arch::wasm32::unreachable()
    };
    // SAFETY: the layout is non-zero sized and valid (checked above); `old_ptr` was
    // allocated with `old_len` and `align` by this function, per the caller's contract
    // (from the arena or from the global allocator, whose realloc tells them apart).
    let ptr = unsafe {
        if old_len == 0 {
            let p = arena::alloc(layout);
            if p.is_null() { allocate(layout) } else { p }
        } else {
            realloc(
                old_ptr,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable()
    }
    ptr
}

#[cfg(all(target_arch = "wasm32", not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

/// A policy: built once per instance from its settings, then asked about facts.
pub trait Policy: Sized + Send + Sync + 'static {
    /// Builds the policy from the settings of its config. An error rejects the module
    /// (at start-up or reload); say which setting and why.
    fn init(settings: &Settings) -> Result<Self, String>;

    /// The verdict for one fact.
    fn decide(&self, ctx: &Context, fact: &Fact) -> Verdict;

    /// The verdicts for a batch, one per fact in order. Override it to look at a
    /// batch as a whole; the default asks [`Policy::decide`] for each fact.
    fn decide_batch(&self, ctx: &Context, facts: &[Fact]) -> Vec<Verdict> {
        facts.iter().map(|f| self.decide(ctx, f)).collect()
    }
}

/// The settings of a policy's config, sorted by key.
#[derive(Debug, Clone, Default)]
pub struct Settings(Vec<(String, String)>);

impl Settings {
    /// Settings from key/value pairs.
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Settings(pairs)
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key`, or an error naming the missing setting.
    pub fn require(&self, key: &str) -> Result<&str, String> {
        self.get(key)
            .ok_or_else(|| format!("setting `{key}` is required"))
    }

    /// A comma-separated value as a list of trimmed, non-empty items (empty if unset).
    pub fn list(&self, key: &str) -> Vec<String> {
        self.get(key)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every key/value pair.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl Fact {
    /// The value of label `key`, if the fact carries it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The subject's kind: `batch` in `batch:PlantA/B1042`.
    pub fn subject_kind(&self) -> &str {
        self.subject
            .split_once(':')
            .map_or(&self.subject, |(k, _)| k)
    }
}

impl Verdict {
    /// A denial with `reason`.
    pub fn deny(reason: impl Into<String>) -> Verdict {
        Verdict::Deny(reason.into())
    }

    /// A filter with `reason`: at intake the fact is dropped and recorded, not
    /// quarantined.
    pub fn filter(reason: impl Into<String>) -> Verdict {
        Verdict::Filter(reason.into())
    }
}

/// Writes a line to the gateway's log, tagged with the policy's name.
pub fn log(level: Level, message: &str) {
    bindings::bsfg::policy::host::log(level, message);
}

/// Where [`export_policy!`] keeps the instance's policy. Not for direct use.
#[doc(hidden)]
pub struct Slot<P>(once_cell::race::OnceBox<P>);

impl<P: Policy> Slot<P> {
    #[doc(hidden)]
    pub const fn new() -> Self {
        Slot(once_cell::race::OnceBox::new())
    }

    #[doc(hidden)]
    pub fn init(&self, settings: Vec<(String, String)>) -> Result<(), String> {
        let settings = Settings::new(settings);
        let p = P::init(&settings);
        end_of_call(settings);
        let p = p?;
        // A second init (the host never sends one) keeps the first policy.
        let _ = self.0.set(alloc::boxed::Box::new(p));
        Ok(())
    }

    #[doc(hidden)]
    pub fn decide(&self, ctx: Context, facts: Vec<Fact>) -> Vec<Verdict> {
        let verdicts = self.decide_inputs(&ctx, &facts);
        end_of_call((ctx, facts));
        verdicts
    }

    fn decide_inputs(&self, ctx: &Context, facts: &[Fact]) -> Vec<Verdict> {
        match self.0.get() {
            Some(p) => p.decide_batch(ctx, facts),
            None => match P::init(&Settings::default()) {
                Ok(p) => self
                    .0
                    .get_or_init(|| alloc::boxed::Box::new(p))
                    .decide_batch(ctx, facts),
                Err(e) => facts
                    .iter()
                    .map(|_| Verdict::Deny(format!("policy not initialised: {e}")))
                    .collect(),
            },
        }
    }
}

/// Drops a call's inputs, then releases the memory the host put them in.
fn end_of_call<T>(inputs: T) {
    drop(inputs);
    #[cfg(target_arch = "wasm32")]
    arena::reset();
}

/// Exports a [`Policy`] type as the component's `init` and `decide`.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        static __BSFG_POLICY: $crate::Slot<$policy> = $crate::Slot::new();
        struct __BsfgExport;
        impl $crate::bindings::Guest for __BsfgExport {
            fn init(
                settings: $crate::Vec<($crate::String, $crate::String)>,
            ) -> ::core::result::Result<(), $crate::String> {
                __BSFG_POLICY.init(settings)
            }
            fn decide(
                ctx: $crate::Context,
                facts: $crate::Vec<$crate::Fact>,
            ) -> $crate::Vec<$crate::Verdict> {
                __BSFG_POLICY.decide(ctx, facts)
            }
        }
        $crate::bindings::export_bindings!(__BsfgExport with_types_in $crate::bindings);
    };
}
