//! The address spaces a symbolizer meets, as types, so that one cannot be passed for another.
//!
//! - [`RuntimeAddress`]: where an instruction was in the memory of the running process (what
//!   an unwinder finds on a stack, what `/proc/PID/maps` ranges hold).
//! - [`FileAddress`]: the same instruction's address as the ELF file states it (its *stated
//!   virtual memory address*, SVMA: what `nm`, `objdump` and DWARF say). Runtime address =
//!   file address + the object's load bias, which [`RuntimeAddress::to_file`] subtracts.
//! - [`FileOffset`]: a byte position in the file (what `/proc/PID/maps` and a pprof mapping's
//!   `file_offset` hold); a segment maps file offsets to file addresses.
//!
//! The symbolizer takes file addresses. A plain `u64` converts into a [`FileAddress`] (tests
//! and tools that read addresses from `nm` have nothing else); a [`RuntimeAddress`] does not:
//! it must go through [`RuntimeAddress::to_file`].

/// An address in the memory of the running process. See the [module doc](self).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct RuntimeAddress(pub u64);

/// An address as the ELF file states it (SVMA). See the [module doc](self).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct FileAddress(pub u64);

/// A byte position in a file. See the [module doc](self).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct FileOffset(pub u64);

impl RuntimeAddress {
    /// The file address of this runtime address in an object loaded with `load_bias`
    /// (runtime address − load bias, wrapping as the loader's arithmetic does).
    pub fn to_file(self, load_bias: u64) -> FileAddress {
        FileAddress(self.0.wrapping_sub(load_bias))
    }
}

impl From<u64> for FileAddress {
    fn from(address: u64) -> FileAddress {
        FileAddress(address)
    }
}

impl std::fmt::LowerHex for RuntimeAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

impl std::fmt::LowerHex for FileAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_minus_load_bias_is_the_file_address() {
        assert_eq!(
            RuntimeAddress(0x7f00_1234).to_file(0x7f00_0000),
            FileAddress(0x1234)
        );
        // A non-PIE executable has a zero bias; a bias above the address wraps, as in the loader.
        assert_eq!(RuntimeAddress(0x401000).to_file(0), FileAddress(0x401000));
        assert_eq!(RuntimeAddress(0).to_file(1), FileAddress(u64::MAX));
    }
}
