//! Bounded fuzzing inside `cargo test`: a fixed time budget per target (arbtest on
//! stable Rust) and a byte-level mutator that starts from valid inputs, so the
//! fuzzer reaches past the first parse error.

use arbtest::arbitrary::{Result, Unstructured};

/// Milliseconds each fuzz target runs: `BSFG_FUZZ_MS`, default 3000.
pub fn budget_ms() -> u64 {
    std::env::var("BSFG_FUZZ_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// `seed` with up to eight random edits: flipped bytes, truncation, inserted runs of
/// random or repeated bytes, duplicated slices, removed slices.
pub fn mutate(u: &mut Unstructured<'_>, seed: &[u8]) -> Result<Vec<u8>> {
    let mut b = seed.to_vec();
    for _ in 0..u.int_in_range(1..=8)? {
        let len = b.len();
        let at = if len == 0 {
            0
        } else {
            u.choose_index(len + 1)?
        };
        match u.int_in_range(0..=5)? {
            0 if at < len => b[at] ^= 1 << u.int_in_range(0..=7)?,
            1 => b.truncate(at),
            2 => {
                let ins: Vec<u8> = u.arbitrary()?;
                b.splice(at..at, ins);
            }
            3 => {
                let byte: u8 = u.arbitrary()?;
                let n = u.int_in_range(1..=64)?;
                b.splice(at..at, std::iter::repeat_n(byte, n));
            }
            4 if at < len => {
                let end = u.int_in_range(at..=len)?;
                let piece = b[at..end].to_vec();
                b.splice(at..at, piece);
            }
            5 if at < len => {
                let end = u.int_in_range(at..=len)?;
                b.drain(at..end);
            }
            _ => {}
        }
    }
    Ok(b)
}

/// Runs `target` on fuzz input for [`budget_ms`] and returns how many inputs it
/// tried. A panic inside fails the test and prints the seed that replays it. Fewer
/// than 100 inputs means the target did not really run, which also fails.
pub fn run(name: &str, mut target: impl FnMut(&mut Unstructured<'_>) -> Result<()>) -> u64 {
    let mut n = 0u64;
    let budget = budget_ms();
    arbtest::arbtest(|u| {
        n += 1;
        target(u)
    })
    .budget_ms(budget);
    eprintln!("fuzz {name}: {n} inputs in {budget} ms, no panic");
    assert!(n >= 100, "fuzz {name}: only {n} inputs ran");
    n
}
