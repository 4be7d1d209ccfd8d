//! Names as stored in objects to names as people read them.
//!
//! The mangling scheme is recognised from the name itself, not from the DWARF language of the
//! unit: symbol-table names have no language, and LTO mixes languages in one unit. Rust names
//! (legacy `_ZN…17h<hash>E` and v0 `_R…`) are tried first and printed without the hash, then
//! Itanium C++ names, printed as `c++filt` prints them (`ns::Klass::method(int) const`,
//! `foo(int) [clone .cold]`). Anything else — C names, names of other schemes, malformed
//! mangled names — is returned unchanged. The work is done by `rustc-demangle` and
//! `cpp_demangle` through `addr2line::demangle_auto`.

use std::borrow::Cow;

/// The readable form of `raw`; `raw` itself when it is not a mangled name we know. A PLT
/// stub's name (`_Znwm@plt`) keeps its suffix after the demangled function (`operator
/// new(unsigned long)@plt`).
pub(crate) fn demangle(raw: &str) -> String {
    if let Some(function) = raw.strip_suffix("@plt") {
        return format!("{}@plt", demangle(function));
    }
    addr2line::demangle_auto(Cow::Borrowed(raw), None).into_owned()
}

#[cfg(test)]
mod tests {
    use super::demangle;

    #[test]
    fn plt_stubs_keep_their_suffix() {
        assert_eq!(demangle("memcmp@plt"), "memcmp@plt");
        assert_eq!(demangle("_Znwm@plt"), "operator new(unsigned long)@plt");
    }

    #[test]
    fn cpp_names_read_like_cxxfilt() {
        assert_eq!(demangle("_ZN2ns5Klass6methodEi"), "ns::Klass::method(int)");
        assert_eq!(demangle("_ZNK2ns5Klass3getEv"), "ns::Klass::get() const");
        assert_eq!(
            demangle("_ZN2ns5Klass6methodEi.cold"),
            "ns::Klass::method(int) [clone .cold]"
        );
        assert_eq!(
            demangle("_ZNSt6vectorIiSaIiEE9push_backERKi"),
            "std::vector<int, std::allocator<int> >::push_back(int const&)"
        );
    }

    #[test]
    fn rust_names_lose_their_hash() {
        assert_eq!(
            demangle("_ZN3std2rt10lang_start17h0123456789abcdefE"),
            "std::rt::lang_start"
        );
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
    }

    #[test]
    fn other_names_are_kept() {
        for name in ["main", "malloc", "_Z", "_ZN", "_R", "", "__libc_start_main"] {
            assert_eq!(demangle(name), name);
        }
    }
}
