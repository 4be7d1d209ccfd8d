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

/// Parses a profile from bytes, gzipped or not.
pub fn decode(bytes: &[u8]) -> anyhow::Result<Profile> {
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .context("gunzip")?;
        out
    } else {
        bytes.to_vec()
    };
    Profile::decode(raw.as_slice()).context("not a pprof protobuf")
}

/// Reads and parses a profile file.
pub fn read_file(path: &Path) -> anyhow::Result<Profile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode(&bytes).with_context(|| format!("parsing {}", path.display()))
}

pub mod builder;
pub mod merge;
