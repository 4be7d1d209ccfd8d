//! Keeps a bug in a parser from taking the caller down: [`catch`] runs one piece of
//! symbolization and turns a panic in it into a [`Miss::SymbolizerPanicked`] with the panic's
//! message, printed by no one (the caller says once what it lost; see the collector).
//!
//! This needs `panic = "unwind"`, which the workspace builds with; only the preload, whose
//! exported functions cannot unwind, aborts. While a thread is inside [`catch`], the panic
//! hook this module installs (once, chained to the one before it) keeps the message for
//! [`catch`] instead of printing it; every other panic is printed by the previous hook as
//! before.
//!
//! For the end-to-end tests only, the `test-hooks` feature makes the opening of a file whose
//! name is `ANYPROF_TEST_SYMBOLIZER_PANIC` panic ([`panic_if_asked`]): the stand-in for a
//! parser bug on a malformed file, which no fuzzer has found yet.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use crate::Miss;

thread_local! {
    /// How many [`catch`] calls this thread is inside.
    static CATCHING: Cell<u32> = const { Cell::new(0) };
    /// The message of the last panic caught on this thread, with its place.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `work`; a panic in it becomes a [`Miss::SymbolizerPanicked`].
pub(crate) fn catch<R>(work: impl FnOnce() -> R) -> Result<R, Miss> {
    install_hook();
    CATCHING.with(|c| c.set(c.get() + 1));
    let result = panic::catch_unwind(AssertUnwindSafe(work));
    CATCHING.with(|c| c.set(c.get().saturating_sub(1)));
    result.map_err(|payload| {
        let text = CAUGHT
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| payload_text(&*payload).to_owned());
        Miss::SymbolizerPanicked(text)
    })
}

fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CATCHING.try_with(Cell::get).unwrap_or(0) == 0 {
                return previous(info);
            }
            let mut text = payload_text(info.payload()).to_owned();
            if let Some(place) = info.location() {
                text = format!("{text}, at {place}");
            }
            let _ = CAUGHT.try_with(|c| *c.borrow_mut() = Some(text));
        }));
    });
}

fn payload_text(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// With the `test-hooks` feature: panics when the file name of `path` is the value of
/// `ANYPROF_TEST_SYMBOLIZER_PANIC`, as a parser bug would on a malformed file. Without the
/// feature (any build of `anyprof` alone: `cargo build -p anyprof`, `cargo install`) it does
/// nothing.
pub(crate) fn panic_if_asked(path: &std::path::Path) {
    #[cfg(feature = "test-hooks")]
    if let Some(name) = std::env::var_os("ANYPROF_TEST_SYMBOLIZER_PANIC") {
        if path.file_name() == Some(name.as_os_str()) {
            panic!(
                "ANYPROF_TEST_SYMBOLIZER_PANIC: failing on {} as a parser bug would",
                path.display()
            );
        }
    }
    #[cfg(not(feature = "test-hooks"))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_miss_with_its_message_and_place() {
        let caught = catch(|| -> u32 { panic!("bad unit {}", 7) });
        let Err(Miss::SymbolizerPanicked(text)) = caught else {
            panic!("not caught: {caught:?}");
        };
        assert!(text.starts_with("bad unit 7, at "), "{text}");
        assert!(text.contains("panics.rs"), "{text}");
        assert_eq!(catch(|| 5), Ok(5));
    }
}
