//! The pprof profile format: the prost types generated from the vendored
//! `proto/profile.proto`, and reading/writing gzipped profiles.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::Context;
use prost::Message;

/// Generated from `collector/proto/profile.proto` by prost-build (committed so that building
/// needs no `protoc`; `tests/proto_drift.rs` regenerates it where `protoc` exists).
#[allow(clippy::all, missing_docs)]
pub mod proto;

pub use proto::Profile;

/// Serializes `profile` and gzips it, as pprof files are stored and served.
pub fn encode_gzipped(profile: &Profile) -> Vec<u8> {
    let raw = profile.encode_to_vec();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(&raw);
    gz.finish().unwrap_or_default()
}

/// The most a profile may decompress to: far above any real profile (a few MiB), far below
/// what a gzip bomb (a few MiB that inflate to many GiB) would make us allocate.
pub const MAX_DECOMPRESSED: u64 = 1 << 30;

/// Decompresses gzip `bytes`, refusing (`FileTooLarge`, saying the limit) output of more than
/// `limit` bytes instead of allocating it.
pub fn gunzip_capped(bytes: &[u8], limit: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!(
                "it decompresses to more than {} MiB, more than any profile",
                limit >> 20
            ),
        ));
    }
    Ok(out)
}

/// Parses a profile from bytes, gzipped or not.
pub fn decode(bytes: &[u8]) -> anyhow::Result<Profile> {
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        gunzip_capped(bytes, MAX_DECOMPRESSED).context("gunzip")?
    } else {
        bytes.to_vec()
    };
    Profile::decode(raw.as_slice()).context("not a pprof protobuf")
}

#[cfg(test)]
mod tests {
    /// A gzip bomb is refused at the limit, with the limit in the message; below it, the
    /// data comes back whole.
    #[test]
    fn gunzip_stops_at_the_limit() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 4 << 20]).unwrap();
        let bomb = gz.finish().unwrap();
        let err = super::gunzip_capped(&bomb, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("more than 1 MiB"), "{err}");
        assert_eq!(super::gunzip_capped(&bomb, 4 << 20).unwrap().len(), 4 << 20);
    }
}

/// Reads and parses a profile file.
pub fn read_file(path: &Path) -> anyhow::Result<Profile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode(&bytes).with_context(|| format!("parsing {}", path.display()))
}

pub mod builder;
pub mod merge;
