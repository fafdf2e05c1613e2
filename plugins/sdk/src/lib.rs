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
        world: "bsfg:policy/policy@0.1.0",
        pub_export_macro: true,
        export_macro_name: "export_bindings",
        default_bindings_module: "bsfg_policy_sdk::bindings",
    });
}

pub use bindings::bsfg::policy::host::Level;
pub use bindings::bsfg::policy::types::{ArtifactRef, Context, Fact, Hook, Verdict};

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

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
    // allocated with `old_len` and `align` by this function, per the caller's contract.
    let ptr = unsafe {
        if old_len == 0 {
            allocate(layout)
        } else {
            realloc(old_ptr, Layout::from_size_align_unchecked(old_len, align), new_len)
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
        self.subject.split_once(':').map_or(&self.subject, |(k, _)| k)
    }
}

impl Verdict {
    /// A denial with `reason`.
    pub fn deny(reason: impl Into<String>) -> Verdict {
        Verdict::Deny(reason.into())
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
        let p = P::init(&Settings::new(settings))?;
        // A second init (the host never sends one) keeps the first policy.
        let _ = self.0.set(alloc::boxed::Box::new(p));
        Ok(())
    }

    #[doc(hidden)]
    pub fn decide(&self, ctx: Context, facts: Vec<Fact>) -> Vec<Verdict> {
        match self.0.get() {
            Some(p) => p.decide_batch(&ctx, &facts),
            None => match P::init(&Settings::default()) {
                Ok(p) => self.0.get_or_init(|| alloc::boxed::Box::new(p)).decide_batch(&ctx, &facts),
                Err(e) => facts
                    .iter()
                    .map(|_| Verdict::Deny(format!("policy not initialised: {e}")))
                    .collect(),
            },
        }
    }
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
