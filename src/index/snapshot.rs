//! OWNER: index helper. Snapshot to disk and back: stubs.

use std::path::Path;

use super::Index;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot {0} is corrupt: {1}")]
    Corrupt(String, String),
}

/// Writes atomically (temp file, fsync, rename, fsync of the directory).
#[allow(unused_variables)]
pub fn save(index: &Index, path: &Path) -> Result<(), SnapshotError> {
    todo!()
}

/// `Ok(None)` when there is no snapshot; `Err(Corrupt)` when it is unreadable (never half-read).
#[allow(unused_variables)]
pub fn load(path: &Path) -> Result<Option<Index>, SnapshotError> {
    todo!()
}
